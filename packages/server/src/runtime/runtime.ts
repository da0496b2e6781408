/**
 * The runtime interface: how the server gets an isolated Linux environment with an agent inside.
 * Runtimes declare what they can do (capabilities) rather than throwing when asked; the sandbox
 * manager and the API never look past this interface.
 */
import type { AgentChannel } from '../agent-channel.js';

export interface RuntimeCapabilities {
  /** Copy-on-write fork of a live sandbox. */
  fork: boolean;
  /** Freeze to disk and resume. */
  freeze: boolean;
  /** Outbound network when asked for (egress: true). */
  egress: boolean;
}

export interface SandboxSpec {
  /** The API id (sbx_…); also names the sandbox's directories. */
  id: string;
  template: string;
  egress: boolean;
  hostname: string;
  /** Extra environment for the agent (and so the interpreter). */
  env?: Record<string, string>;
}

export interface RuntimeSandbox {
  readonly id: string;
  readonly channel: AgentChannel;
  /** Resolves once, when the sandbox has died for any reason (destroyed, crashed, killed). */
  readonly exited: Promise<{ reason: string }>;
  /** Kills every process of the sandbox and removes its files; safe to call more than once. */
  destroy(): Promise<void>;
  /** Proportional set size of all the sandbox's processes, in bytes. */
  memoryPss(): Promise<number>;
}

export interface Runtime {
  readonly name: 'ns' | 'vm';
  readonly capabilities: RuntimeCapabilities;
  /** Removes what an earlier, crashed server left behind (mounts, directories, processes). */
  cleanupOrphans(): Promise<void>;
  start(spec: SandboxSpec): Promise<RuntimeSandbox>;
  /** Destroys every sandbox this runtime started. */
  close(): Promise<void>;
}
