// Generated from the zod schema `PolicySchema` in policy-schema.ts by `npm run gen:shapes`: do not edit.
// test/unit/shape.test.ts fails when this and the schema disagree.
import type { Shape } from '@tapbroker/protocol/core';

export const POLICY_SHAPE: Shape = {
  "t": "object",
  "fields": {
    "version": {"t":"literal","values":[1]},
    "network": {
      "t": "record",
      "key": {"t":"string","max":9007199254740991,"check":"policy-name"},
      "value": {
        "t": "object",
        "fields": {
          "bridge": {"t":"string","max":9007199254740991,"check":"ifname"},
          "ovs": {"t":"string","max":9007199254740991,"check":"ifname"},
          "hook": {"t":"string","max":9007199254740991,"check":"hook-path"},
          "vlan": {"t":"number","int":true,"min":1,"max":4094},
          "trunk": {
            "t": "array",
            "of": {"t":"number","int":true,"min":1,"max":4094},
            "min": 1,
            "max": 9007199254740991,
          },
          "hook_timeout": {"t":"number","int":true,"min":1,"max":300},
          "ovsdb": {"t":"string","max":9007199254740991,"check":"ovsdb"},
          "mac_lock": {"t":"boolean"},
        },
        "optional": ["bridge","ovs","hook","vlan","trunk","hook_timeout","ovsdb","mac_lock"],
        "defaults": {},
        "check": "network",
      },
    },
    "rule": {
      "t": "array",
      "of": {
        "t": "object",
        "fields": {
          "name": {"t":"string","max":9007199254740991,"check":"policy-name"},
          "users": {
            "t": "array",
            "of": {
              "t": "anyOf",
              "options": [{"t":"string","max":256,"min":1},{"t":"number","int":true,"min":0,"max":4294967294}],
            },
            "min": 0,
            "max": 9007199254740991,
          },
          "groups": {
            "t": "array",
            "of": {
              "t": "anyOf",
              "options": [{"t":"string","max":256,"min":1},{"t":"number","int":true,"min":0,"max":4294967294}],
            },
            "min": 0,
            "max": 9007199254740991,
          },
          "bridges": {
            "t": "array",
            "of": {"t":"string","max":9007199254740991,"check":"bridge-name"},
            "min": 0,
            "max": 9007199254740991,
          },
          "macvtap": {
            "t": "array",
            "of": {
              "t": "object",
              "fields": {
                "parent": {"t":"string","max":9007199254740991,"check":"ifname"},
                "modes": {
                  "t": "array",
                  "of": {"t":"enum","values":["bridge","vepa","private","passthru"]},
                  "min": 1,
                  "max": 9007199254740991,
                },
              },
              "optional": [],
              "defaults": {"modes":["bridge"]},
            },
            "min": 0,
            "max": 9007199254740991,
          },
          "networks": {
            "t": "array",
            "of": {"t":"string","max":9007199254740991,"check":"policy-name"},
            "min": 0,
            "max": 9007199254740991,
          },
          "persistent": {"t":"boolean"},
          "name_pattern": {"t":"string","max":9007199254740991,"check":"name-pattern"},
          "max_queues": {"t":"number","int":true,"min":1,"max":126},
          "vhost": {"t":"boolean"},
          "mac_prefix": {"t":"string","max":9007199254740991,"check":"mac-prefix"},
          "max_devices": {"t":"number","int":true,"min":0,"max":9007199254740991},
          "mac_lock": {"t":"boolean"},
        },
        "optional": ["users","groups","max_devices"],
        "defaults": {
          "bridges": [],
          "macvtap": [],
          "networks": [],
          "persistent": false,
          "name_pattern": "tb{uid}-*",
          "max_queues": 1,
          "vhost": false,
          "mac_prefix": "52:54:00",
          "mac_lock": false,
        },
      },
      "min": 0,
      "max": 9007199254740991,
    },
    "deny": {
      "t": "array",
      "of": {
        "t": "object",
        "fields": {
          "name": {"t":"string","max":9007199254740991,"check":"policy-name"},
          "users": {
            "t": "array",
            "of": {
              "t": "anyOf",
              "options": [{"t":"string","max":256,"min":1},{"t":"number","int":true,"min":0,"max":4294967294}],
            },
            "min": 0,
            "max": 9007199254740991,
          },
          "groups": {
            "t": "array",
            "of": {
              "t": "anyOf",
              "options": [{"t":"string","max":256,"min":1},{"t":"number","int":true,"min":0,"max":4294967294}],
            },
            "min": 0,
            "max": 9007199254740991,
          },
          "bridges": {
            "t": "array",
            "of": {"t":"string","max":9007199254740991,"check":"bridge-name"},
            "min": 1,
            "max": 9007199254740991,
          },
          "parents": {
            "t": "array",
            "of": {"t":"string","max":9007199254740991,"check":"ifname"},
            "min": 1,
            "max": 9007199254740991,
          },
          "networks": {
            "t": "array",
            "of": {"t":"string","max":9007199254740991,"check":"policy-name"},
            "min": 1,
            "max": 9007199254740991,
          },
        },
        "optional": ["name","users","groups","bridges","parents","networks"],
        "defaults": {},
      },
      "min": 0,
      "max": 9007199254740991,
    },
  },
  "optional": ["version"],
  "defaults": {"network":{},"rule":[],"deny":[]},
};
