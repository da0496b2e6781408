/**
 * The runtimes this server is built with, each registered under its name: the one place the
 * built-in runtime names are written. A new runtime is a new driver folder and one line here.
 */
import { RuntimeRegistry } from '@podflare/runtime';
import type { DriverContext, ServerDriver, ServerRuntimes } from './driver-context.js';
import { namespaceDriver } from './namespace/driver.js';
import { vmDriver } from './vm/driver.js';

/** The built-in drivers, in the order `auto` falls back through (the first usable is the default). */
export function builtinRuntimes(): ServerRuntimes {
  return new RuntimeRegistry<DriverContext, ServerDriver>()
    .register('ns', namespaceDriver)
    .register('vm', vmDriver);
}
