/**
 * Podflare's MCP server: sandboxes with a persistent Python interpreter, fork, diff and merge, as MCP
 * tools for Claude Desktop, Cursor, Zed and any MCP client. The `podflare-mcp` command (main.ts)
 * serves it over stdio or Streamable HTTP; this module lets a program embed it.
 *
 * @example
 * ```ts
 * import { StdioServerTransport } from '@modelcontextprotocol/sdk/server/stdio.js';
 * import { createPodflareMcpServer } from '@podflare/mcp';
 *
 * const server = createPodflareMcpServer({ host: 'http://127.0.0.1:7070' });
 * await server.connect(new StdioServerTransport());
 * ```
 * @packageDocumentation
 */
export { createPodflareMcpServer, PodflareMcpServer, SERVER_NAME, SERVER_VERSION } from './server.js';
export type { PodflareMcpServerOptions } from './server.js';
export { startPodflareMcpHttpServer, DEFAULT_HTTP_PORT, MCP_PATH } from './http.js';
export type { PodflareMcpHttpOptions, PodflareMcpHttpServer } from './http.js';
export { createMcpHttpHandler } from './http-handler.js';
export type { McpCaller, McpHttpHandler, McpHttpHandlerOptions } from './http-handler.js';
export { SandboxSession, SessionClosedError, MissingSandboxIdError } from './session.js';
export type { SandboxSessionOptions, WithSandbox } from './session.js';
