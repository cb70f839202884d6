// Generated from the zod schema `StateFile` in lease-schema.ts by `npm run gen:shapes`: do not edit.
// test/unit/shape.test.ts fails when this and the schema disagree.
import type { Shape } from '@tapbroker/protocol/core';

export const STATE_SHAPE: Shape = {
  "t": "object",
  "fields": {
    "version": {"t":"literal","values":[1]},
    "broker": {"t":"string","max":128},
    "leases": {
      "t": "array",
      "of": {
        "t": "object",
        "fields": {
          "id": {"t":"string","max":32},
          "uid": {"t":"number","int":true,"min":0,"max":9007199254740991},
          "user": {"t":"nullable","of":{"t":"string","max":256}},
          "kind": {"t":"enum","values":["tap","macvtap"]},
          "name": {"t":"string","max":15},
          "ifindex": {"t":"number","int":true,"min":1,"max":9007199254740991},
          "parent": {"t":"string","max":15},
          "network": {"t":"nullable","of":{"t":"string","max":64}},
          "mode": {"t":"nullable","of":{"t":"enum","values":["bridge","vepa","private","passthru"]}},
          "mac": {"t":"nullable","of":{"t":"string","max":17}},
          "locked": {"t":"boolean"},
          "queues": {"t":"number","int":true,"min":1,"max":9007199254740991},
          "rule": {"t":"string","max":128},
          "created": {"t":"string","max":64},
          "ends": {"t":"enum","values":["fds","holder","release"]},
          "holder": {"t":"nullable","of":{"t":"number","int":true,"min":1,"max":9007199254740991}},
          "holder_start": {"t":"nullable","of":{"t":"number","int":true,"min":0,"max":9007199254740991}},
          "group": {"t":"nullable","of":{"t":"number","int":true,"min":0,"max":9007199254740991}},
          "plug": {
            "t": "nullable",
            "of": {
              "t": "anyOf",
              "options": [
                {
                  "t": "object",
                  "fields": {
                    "ovs": {"t":"string","max":9007199254740991},
                    "db": {"t":"string","max":9007199254740991},
                  },
                  "optional": [],
                  "defaults": {},
                },
                {
                  "t": "object",
                  "fields": {
                    "hook": {"t":"string","max":9007199254740991},
                    "timeout_ms": {"t":"number","int":true,"min":1,"max":9007199254740991},
                  },
                  "optional": [],
                  "defaults": {},
                },
              ],
            },
          },
          "host_mac": {"t":"nullable","of":{"t":"string","max":9007199254740991}},
          "vlan": {
            "t": "nullable",
            "of": {"t":"number","int":true,"min":-9007199254740991,"max":9007199254740991},
          },
        },
        "optional": [],
        "defaults": {"network":null,"locked":false,"group":null,"plug":null,"host_mac":null,"vlan":null},
      },
      "min": 0,
      "max": 9007199254740991,
    },
    "intents": {
      "t": "array",
      "of": {
        "t": "object",
        "fields": {
          "id": {"t":"string","max":9007199254740991},
          "name": {"t":"string","max":9007199254740991},
          "parent": {"t":"string","max":9007199254740991},
          "mac": {"t":"string","max":9007199254740991},
        },
        "optional": [],
        "defaults": {},
      },
      "min": 0,
      "max": 9007199254740991,
    },
    "ovsdbs": {"t":"array","of":{"t":"string","max":9007199254740991},"min":0,"max":9007199254740991},
    "downs": {
      "t": "array",
      "of": {
        "t": "object",
        "fields": {
          "id": {"t":"string","max":32},
          "uid": {"t":"number","int":true,"min":0,"max":9007199254740991},
          "user": {"t":"nullable","of":{"t":"string","max":256}},
          "kind": {"t":"enum","values":["tap","macvtap"]},
          "name": {"t":"string","max":15},
          "ifindex": {"t":"number","int":true,"min":1,"max":9007199254740991},
          "parent": {"t":"string","max":15},
          "network": {"t":"nullable","of":{"t":"string","max":64}},
          "mode": {"t":"nullable","of":{"t":"enum","values":["bridge","vepa","private","passthru"]}},
          "mac": {"t":"nullable","of":{"t":"string","max":17}},
          "locked": {"t":"boolean"},
          "queues": {"t":"number","int":true,"min":1,"max":9007199254740991},
          "rule": {"t":"string","max":128},
          "created": {"t":"string","max":64},
          "ends": {"t":"enum","values":["fds","holder","release"]},
          "holder": {"t":"nullable","of":{"t":"number","int":true,"min":1,"max":9007199254740991}},
          "holder_start": {"t":"nullable","of":{"t":"number","int":true,"min":0,"max":9007199254740991}},
          "group": {"t":"nullable","of":{"t":"number","int":true,"min":0,"max":9007199254740991}},
          "plug": {
            "t": "nullable",
            "of": {
              "t": "anyOf",
              "options": [
                {
                  "t": "object",
                  "fields": {
                    "ovs": {"t":"string","max":9007199254740991},
                    "db": {"t":"string","max":9007199254740991},
                  },
                  "optional": [],
                  "defaults": {},
                },
                {
                  "t": "object",
                  "fields": {
                    "hook": {"t":"string","max":9007199254740991},
                    "timeout_ms": {"t":"number","int":true,"min":1,"max":9007199254740991},
                  },
                  "optional": [],
                  "defaults": {},
                },
              ],
            },
          },
          "host_mac": {"t":"nullable","of":{"t":"string","max":9007199254740991}},
          "vlan": {
            "t": "nullable",
            "of": {"t":"number","int":true,"min":-9007199254740991,"max":9007199254740991},
          },
        },
        "optional": [],
        "defaults": {"network":null,"locked":false,"group":null,"plug":null,"host_mac":null,"vlan":null},
      },
      "min": 0,
      "max": 9007199254740991,
    },
    "pending": {"t":"array","of":{"t":"string","max":9007199254740991},"min":0,"max":9007199254740991},
    "kept": {"t":"array","of":{"t":"string","max":9007199254740991},"min":0,"max":9007199254740991},
    "taken": {
      "t": "array",
      "of": {
        "t": "object",
        "fields": {
          "who": {"t":"string","max":32},
          "key": {"t":"string","max":64},
          "until": {"t":"number","int":true,"min":-9007199254740991,"max":9007199254740991},
        },
        "optional": [],
        "defaults": {},
      },
      "min": 0,
      "max": 9007199254740991,
    },
    "retiring": {
      "t": "array",
      "of": {
        "t": "object",
        "fields": {
          "lease": {
            "t": "object",
            "fields": {
              "id": {"t":"string","max":32},
              "uid": {"t":"number","int":true,"min":0,"max":9007199254740991},
              "user": {"t":"nullable","of":{"t":"string","max":256}},
              "kind": {"t":"enum","values":["tap","macvtap"]},
              "name": {"t":"string","max":15},
              "ifindex": {"t":"number","int":true,"min":1,"max":9007199254740991},
              "parent": {"t":"string","max":15},
              "network": {"t":"nullable","of":{"t":"string","max":64}},
              "mode": {"t":"nullable","of":{"t":"enum","values":["bridge","vepa","private","passthru"]}},
              "mac": {"t":"nullable","of":{"t":"string","max":17}},
              "locked": {"t":"boolean"},
              "queues": {"t":"number","int":true,"min":1,"max":9007199254740991},
              "rule": {"t":"string","max":128},
              "created": {"t":"string","max":64},
              "ends": {"t":"enum","values":["fds","holder","release"]},
              "holder": {"t":"nullable","of":{"t":"number","int":true,"min":1,"max":9007199254740991}},
              "holder_start": {"t":"nullable","of":{"t":"number","int":true,"min":0,"max":9007199254740991}},
              "group": {"t":"nullable","of":{"t":"number","int":true,"min":0,"max":9007199254740991}},
              "plug": {
                "t": "nullable",
                "of": {
                  "t": "anyOf",
                  "options": [
                    {
                      "t": "object",
                      "fields": {
                        "ovs": {"t":"string","max":9007199254740991},
                        "db": {"t":"string","max":9007199254740991},
                      },
                      "optional": [],
                      "defaults": {},
                    },
                    {
                      "t": "object",
                      "fields": {
                        "hook": {"t":"string","max":9007199254740991},
                        "timeout_ms": {"t":"number","int":true,"min":1,"max":9007199254740991},
                      },
                      "optional": [],
                      "defaults": {},
                    },
                  ],
                },
              },
              "host_mac": {"t":"nullable","of":{"t":"string","max":9007199254740991}},
              "vlan": {
                "t": "nullable",
                "of": {"t":"number","int":true,"min":-9007199254740991,"max":9007199254740991},
              },
            },
            "optional": [],
            "defaults": {"network":null,"locked":false,"group":null,"plug":null,"host_mac":null,"vlan":null},
          },
          "op": {"t":"string","max":32},
          "decision": {"t":"enum","values":["cleanup","release","reconcile"]},
          "message": {"t":"string","max":4096},
        },
        "optional": [],
        "defaults": {},
      },
      "min": 0,
      "max": 9007199254740991,
    },
  },
  "optional": ["broker"],
  "defaults": {"intents":[],"ovsdbs":[],"downs":[],"pending":[],"kept":[],"taken":[],"retiring":[]},
};
