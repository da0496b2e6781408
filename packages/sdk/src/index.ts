/**
 * Podflare's TypeScript SDK: sandboxes with a persistent Python interpreter, fork/diff/merge, and
 * streamed file transfer, over the REST API of a self-hosted `podflare serve`.
 *
 * @example
 * ```ts
 * import { Sandbox } from 'podflare';
 *
 * const sandbox = await Sandbox.create();          // PODFLARE_HOST, else http://127.0.0.1:7070
 * const { stdout } = await sandbox.runCode('print(6 * 7)');
 * await sandbox.close();
 * ```
 * @packageDocumentation
 */
export { Sandbox } from './sandbox.js';
export { Client, getDefaultClient, DEFAULT_HOST, DEFAULT_REQUEST_TIMEOUT_MS, SDK_VERSION } from './client.js';
export type { ClientOptions } from './client.js';
export { Execution, Result } from './execution.js';
export type { Logs } from './execution.js';
export { Files } from './files.js';
export { Commands, CommandHandle } from './commands.js';
export { Pty, PtyHandle } from './pty.js';
export type { PtyCreateOptions } from './pty.js';
export type { CommandConnectOptions, CommandResult, CommandStartOptions, ProcessInfo, ProcessOutputEvent } from './commands.js';
export {
  PodflareError,
  BadRequestError,
  AuthenticationError,
  ForbiddenError,
  NotFoundError,
  ConflictError,
  NotSupportedError,
  SandboxGoneError,
  PayloadTooLargeError,
  InsufficientStorageError,
  RateLimitError,
  TimeoutError,
  ServerError,
  ConnectionError,
  ERROR_CLASSES,
} from './errors.js';
export type { ClientErrorCode, PodflareErrorCode, PodflareErrorInit } from './errors.js';
export { parseNdjson, splitLines } from './ndjson.js';
export type {
  Capacity,
  CheckpointInfo,
  ConnectionOptions,
  DiffOptions,
  DiffResult,
  ExecOptions,
  ExecRequest,
  FileOptions,
  FileStat,
  Language,
  MergeOptions,
  PoolStats,
  RemoveOptions,
  RunCodeOptions,
  RunCodeRequest,
  Runtime,
  SandboxCreateOptions,
  SandboxInfo,
  SandboxLimits,
  SandboxListOptions,
  SandboxState,
  SavedTemplate,
  TemplateInfo,
  UploadData,
  UploadResult,
} from './types.js';
export type { EgressPolicy, EgressSetting } from '@podflare/protocol/egress';
export type { SandboxEvent, EgressEventData } from '@podflare/protocol/events';
export { EXIT_CODES, KILLED_EXIT_CODE, TIMEOUT_EXIT_CODE } from '@podflare/protocol/events';
export { ENDED_SANDBOX_STATES, SANDBOX_ID_PATTERN, SANDBOX_STATES, isEndedState, isSandboxId } from '@podflare/protocol/sandbox';
export type { EndedSandboxState } from '@podflare/protocol/sandbox';
export type {
  ExecEvent,
  ExecEventType,
  ExecErrorInfo,
  StdoutEvent,
  StderrEvent,
  ResultEvent,
  ErrorEvent,
  ExitEvent,
  MimeBundle,
} from '@podflare/protocol/events';
export type { ErrorCode, ErrorBody } from '@podflare/protocol/errors';
