// Generated from the zod schema `Request` in messages.ts by `npm run gen:shapes`: do not edit.
// test/unit/shape.test.ts fails when this and the schema disagree.
import type { Shape } from './shape.js';

export const REQUEST_SHAPE: Shape = {
  "t": "union",
  "key": "op",
  "options": {
    "hello": {
      "t": "object",
      "fields": {
        "op": {"t":"literal","values":["hello"]},
        "id": {"t":"number","int":true,"min":0,"max":4294967295},
        "version": {"t":"number","int":true,"min":-9007199254740991,"max":9007199254740991},
        "client": {"t":"string","max":128},
      },
      "optional": ["client"],
      "defaults": {},
    },
    "create-tap": {
      "t": "object",
      "fields": {
        "op": {"t":"literal","values":["create-tap"]},
        "id": {"t":"number","int":true,"min":0,"max":4294967295},
        "bridge": {"t":"string","max":64},
        "network": {"t":"string","max":64},
        "queues": {"t":"number","int":true,"min":-9007199254740991,"max":9007199254740991},
        "vhost": {"t":"boolean"},
        "vnet_hdr": {"t":"boolean"},
        "mac": {"t":"nullable","of":{"t":"string","max":64}},
        "name": {"t":"string","max":64},
        "persistent": {"t":"boolean"},
        "group": {"t":"number","int":true,"min":0,"max":4294967294},
      },
      "optional": ["bridge","network","queues","vhost","vnet_hdr","mac","name","persistent","group"],
      "defaults": {},
    },
    "create-macvtap": {
      "t": "object",
      "fields": {
        "op": {"t":"literal","values":["create-macvtap"]},
        "id": {"t":"number","int":true,"min":0,"max":4294967295},
        "parent": {"t":"string","max":64},
        "mode": {"t":"enum","values":["bridge","vepa","private","passthru"]},
        "queues": {"t":"number","int":true,"min":-9007199254740991,"max":9007199254740991},
        "vhost": {"t":"boolean"},
        "vnet_hdr": {"t":"boolean"},
        "mac": {"t":"nullable","of":{"t":"string","max":64}},
        "name": {"t":"string","max":64},
        "persistent": {"t":"boolean"},
      },
      "optional": ["mode","queues","vhost","vnet_hdr","mac","name","persistent"],
      "defaults": {},
    },
    "create": {
      "t": "object",
      "fields": {
        "op": {"t":"literal","values":["create"]},
        "id": {"t":"number","int":true,"min":0,"max":4294967295},
        "nics": {
          "t": "array",
          "of": {
            "t": "union",
            "key": "kind",
            "options": {
              "tap": {
                "t": "object",
                "fields": {
                  "kind": {"t":"literal","values":["tap"]},
                  "bridge": {"t":"string","max":64},
                  "network": {"t":"string","max":64},
                  "queues": {"t":"number","int":true,"min":-9007199254740991,"max":9007199254740991},
                  "vhost": {"t":"boolean"},
                  "vnet_hdr": {"t":"boolean"},
                  "mac": {"t":"nullable","of":{"t":"string","max":64}},
                  "name": {"t":"string","max":64},
                  "persistent": {"t":"boolean"},
                  "group": {"t":"number","int":true,"min":0,"max":4294967294},
                },
                "optional": ["bridge","network","queues","vhost","vnet_hdr","mac","name","persistent","group"],
                "defaults": {},
              },
              "macvtap": {
                "t": "object",
                "fields": {
                  "kind": {"t":"literal","values":["macvtap"]},
                  "parent": {"t":"string","max":64},
                  "mode": {"t":"enum","values":["bridge","vepa","private","passthru"]},
                  "queues": {"t":"number","int":true,"min":-9007199254740991,"max":9007199254740991},
                  "vhost": {"t":"boolean"},
                  "vnet_hdr": {"t":"boolean"},
                  "mac": {"t":"nullable","of":{"t":"string","max":64}},
                  "name": {"t":"string","max":64},
                  "persistent": {"t":"boolean"},
                },
                "optional": ["mode","queues","vhost","vnet_hdr","mac","name","persistent"],
                "defaults": {},
              },
            },
          },
          "min": 1,
          "max": 32,
        },
      },
      "optional": [],
      "defaults": {},
    },
    "list": {
      "t": "object",
      "fields": {
        "op": {"t":"literal","values":["list"]},
        "id": {"t":"number","int":true,"min":0,"max":4294967295},
      },
      "optional": [],
      "defaults": {},
    },
    "release": {
      "t": "object",
      "fields": {
        "op": {"t":"literal","values":["release"]},
        "id": {"t":"number","int":true,"min":0,"max":4294967295},
        "name": {"t":"string","max":64},
      },
      "optional": [],
      "defaults": {},
    },
    "reload": {
      "t": "object",
      "fields": {
        "op": {"t":"literal","values":["reload"]},
        "id": {"t":"number","int":true,"min":0,"max":4294967295},
      },
      "optional": [],
      "defaults": {},
    },
    "can": {
      "t": "object",
      "fields": {
        "op": {"t":"literal","values":["can"]},
        "id": {"t":"number","int":true,"min":0,"max":4294967295},
        "kind": {"t":"enum","values":["tap","macvtap","network"]},
        "parent": {"t":"string","max":64},
        "mode": {"t":"enum","values":["bridge","vepa","private","passthru"]},
        "queues": {"t":"number","int":true,"min":-9007199254740991,"max":9007199254740991},
        "vhost": {"t":"boolean"},
        "mac": {"t":"nullable","of":{"t":"string","max":64}},
        "name": {"t":"string","max":64},
        "persistent": {"t":"boolean"},
      },
      "optional": ["mode","queues","vhost","mac","name","persistent"],
      "defaults": {},
    },
    "status": {
      "t": "object",
      "fields": {
        "op": {"t":"literal","values":["status"]},
        "id": {"t":"number","int":true,"min":0,"max":4294967295},
      },
      "optional": [],
      "defaults": {},
    },
  },
};
