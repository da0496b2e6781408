/** Query parameters shared by several routes, checked like body fields: a bad value is a 400 naming it. */
import { ApiError } from './api-error.js';

const TRUE = ['1', 'true', 'yes'];
const FALSE = ['0', 'false', 'no', ''];

/** A boolean query flag (`?recursive=1`); absent is false, anything unrecognised is a 400. */
export function flagParam(query: URLSearchParams, name: string): boolean {
  const value = query.get(name);
  if (value === null) return false;
  const v = value.toLowerCase();
  if (TRUE.includes(v)) return true;
  if (FALSE.includes(v)) return false;
  throw new ApiError('bad_request', `${name}: must be 1/true or 0/false, got "${value.slice(0, 40)}"`, name);
}
