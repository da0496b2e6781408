/**
 * Runtime names. No runtime's name is written here or anywhere outside its driver's registration:
 * a name is whatever string a registered driver carries, and every name that comes in (API,
 * configuration, store) is checked against the registry (registry.ts).
 */

/** The name of a registered runtime driver, as the API, configuration, store and pool spell it. */
export type RuntimeName = string;

/** Asks for the server's default runtime (the API's and configuration's `runtime: "auto"`). */
export const AUTO_RUNTIME = 'auto';

/** What a driver's name may look like: short, lower case, safe in a URL, a log line and a file name. */
export const RUNTIME_NAME_PATTERN = /^[a-z][a-z0-9-]{0,15}$/;
