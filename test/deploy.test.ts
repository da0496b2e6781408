/**
 * The packaging, checked as far as this machine allows (no Kubernetes cluster, no container
 * registry here): every Kubernetes object of the Kustomize base validates against the Kubernetes
 * schemas (kubernetes-models), the cluster-mode properties the issue asks for are there, the
 * commands the manifests, systemd units and Containerfile run are ones the CLI accepts, and the
 * Containerfile copies files that exist.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { describe, it } from 'node:test';
import { parseAllDocuments } from 'yaml';
import * as apps from 'kubernetes-models/apps/v1';
import * as core from 'kubernetes-models/v1';
import * as rbac from 'kubernetes-models/rbac.authorization.k8s.io/v1';

const ROOT = path.resolve(import.meta.dirname, '..');
const BASE = path.join(ROOT, 'deploy/kubernetes/base');
const CLI = path.join(ROOT, 'packages/cli/dist/main.js');

type K8sObject = { apiVersion: string; kind: string; metadata: { name: string }; spec?: any; [field: string]: any };
const MODELS: Record<string, new (o: any) => { validate(): void }> = {
  'apps/v1/DaemonSet': apps.DaemonSet, 'apps/v1/Deployment': apps.Deployment,
  'v1/Service': core.Service, 'v1/Namespace': core.Namespace, 'v1/ServiceAccount': core.ServiceAccount, 'v1/Secret': core.Secret,
  'rbac.authorization.k8s.io/v1/Role': rbac.Role, 'rbac.authorization.k8s.io/v1/RoleBinding': rbac.RoleBinding,
};

function load(file: string): K8sObject[] {
  return parseAllDocuments(readFileSync(file, 'utf8')).map((d) => {
    assert.deepEqual(d.errors, [], `${file}: YAML errors`);
    return d.toJS() as K8sObject;
  }).filter(Boolean);
}
const kustomization = load(path.join(BASE, 'kustomization.yaml'))[0] as unknown as { resources: string[]; namespace: string };
const objects = kustomization.resources.flatMap((r) => load(path.join(BASE, r)));
const find = (kind: string, name: string) => {
  const o = objects.find((x) => x.kind === kind && x.metadata.name === name);
  assert.ok(o, `${kind}/${name} in the base`);
  return o!;
};
/** Runs the CLI's argument parser on a command line (each mode answers --help after parsing its flags). */
function cliAccepts(args: string[]): void {
  execFileSync(process.execPath, [CLI, ...args.map((a) => a.replace(/\$\(\w+\)/g, 'x')), '--help'], { stdio: 'pipe' });
}

describe('Kubernetes manifests (Kustomize base)', () => {
  it('every object validates against the Kubernetes schemas', () => {
    assert.ok(objects.length >= 8);
    for (const o of objects) {
      const Model = MODELS[`${o.apiVersion}/${o.kind}`];
      assert.ok(Model, `no schema for ${o.apiVersion} ${o.kind}`);
      new Model(o).validate();
    }
    for (const o of load(path.join(ROOT, 'deploy/kubernetes/secret.example.yaml'))) new MODELS[`${o.apiVersion}/${o.kind}`]!(o).validate();
  });

  it('a schema violation is caught (the check is real)', () => {
    const ds = structuredClone(find('DaemonSet', 'podflare-node'));
    ds.spec.updateStrategy.type = 42;
    assert.throws(() => new apps.DaemonSet(ds as any).validate());
  });

  it('nodes: a privileged DaemonSet, updated only on delete, that stays on NotReady/unreachable hosts, with probes', () => {
    const ds = find('DaemonSet', 'podflare-node');
    assert.equal(ds.spec.updateStrategy.type, 'OnDelete');
    const pod = ds.spec.template.spec;
    const c = pod.containers[0];
    assert.equal(c.securityContext.privileged, true);
    for (const key of ['node.kubernetes.io/not-ready', 'node.kubernetes.io/unreachable']) {
      const t = pod.tolerations.find((x: any) => x.key === key);
      assert.ok(t && t.operator === 'Exists' && t.effect === 'NoExecute' && t.tolerationSeconds === undefined, `${key} tolerated forever`);
    }
    for (const probe of ['readinessProbe', 'livenessProbe', 'startupProbe']) assert.equal(c[probe].httpGet.path, '/v1/healthz');
    assert.equal(c.args[0], 'node');
    cliAccepts(c.args);
    const env = c.env.map((e: any) => e.name);
    for (const name of ['PODFLARE_DB', 'PODFLARE_NODE_TOKEN', 'PODFLARE_API_KEYS']) assert.ok(env.includes(name), name);
  });

  it('gateways: a Deployment behind a Service, unprivileged, with probes', () => {
    const dep = find('Deployment', 'podflare-gateway');
    const svc = find('Service', 'podflare-gateway');
    const labels = dep.spec.template.metadata.labels;
    for (const [k, v] of Object.entries(svc.spec.selector)) assert.equal(labels[k], v, 'the Service selects the gateway pods');
    assert.ok(dep.spec.replicas >= 2);
    const c = dep.spec.template.spec.containers[0];
    assert.equal(c.securityContext.allowPrivilegeEscalation, false);
    assert.equal(dep.spec.template.spec.securityContext.runAsNonRoot, true);
    assert.equal(c.readinessProbe.httpGet.path, '/v1/healthz');
    assert.equal(c.args[0], 'gateway');
    cliAccepts(c.args);
    assert.equal(svc.spec.ports[0].targetPort, c.ports[0].name);
  });

  it('RBAC: service accounts without API tokens (nothing here calls the Kubernetes API)', () => {
    for (const name of ['podflare-node', 'podflare-gateway']) assert.equal(find('ServiceAccount', name).automountServiceAccountToken, false);
    assert.ok(objects.some((o) => o.kind === 'RoleBinding'));
  });
});

describe('systemd units and the container image definition', () => {
  for (const unit of ['podflare-node.service', 'podflare-gateway.service']) {
    it(`${unit}: runs a command the CLI accepts`, () => {
      const text = readFileSync(path.join(ROOT, 'deploy/systemd', unit), 'utf8');
      const exec = /^ExecStart=\S+ \S+main\.js (.*)$/m.exec(text);
      assert.ok(exec, 'ExecStart runs the CLI');
      cliAccepts(exec![1]!.split(/\s+/));
      assert.match(text, /^EnvironmentFile=/m);
    });
  }

  it('the Containerfile copies files that exist and starts the CLI', () => {
    const text = readFileSync(path.join(ROOT, 'deploy/container/Containerfile'), 'utf8');
    const copies = [...text.matchAll(/^COPY (?!--from)(.+) \S+$/gm)].flatMap((m) => m[1]!.split(/\s+/));
    assert.ok(copies.length >= 4);
    for (const src of copies) assert.ok(existsSync(path.join(ROOT, src)), `COPY ${src}`);
    assert.match(text, /ENTRYPOINT \["node", "\/opt\/podflare\/packages\/cli\/dist\/main\.js"\]/);
  });
});
