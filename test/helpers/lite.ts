// The protocol's client-side entry, for tests.
export { checkShape, decodeReply, encodeRequest, REPLY_SHAPE as REPLY_SHAPE_FOR_TESTS } from '@tapbroker/protocol/lite';
