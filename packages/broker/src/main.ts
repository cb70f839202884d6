#!/usr/bin/env node
// tapbrokerd: the privileged broker (see daemon.ts).
import { daemon } from './daemon.js';

daemon(process.argv.slice(2));
