// Validates every object of the YAML files given as arguments against the Kubernetes schemas of
// kubernetes-models (core and apps objects) and @kubernetes-models/prometheus-operator (the
// ServiceMonitor and PrometheusRule CRDs). Unknown fields are errors. Prints one line per
// object; exits 1 if any object is invalid or of a kind without a schema here.
import { readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";

const OPERATOR_GROUPS = new Set(["monitoring.coreos.com"]);

async function modelFor(apiVersion, kind) {
  const [group, version] = apiVersion.includes("/") ? apiVersion.split("/") : ["", apiVersion];
  const module = OPERATOR_GROUPS.has(group)
    ? `@kubernetes-models/prometheus-operator/${group}/${version}`
    : `kubernetes-models/${group ? `${group}/` : ""}${version}`;
  const models = await import(`${module}/index.js`).catch(() => import(module));
  if (!models[kind]) throw new Error(`no schema for ${apiVersion} ${kind}`);
  return models[kind];
}

let failed = false;
for (const path of process.argv.slice(2)) {
  for (const doc of parseAllDocuments(readFileSync(path, "utf8"))) {
    const object = doc.toJS();
    if (!object) continue;
    const name = `${path}: ${object.kind}/${object.metadata?.name}`;
    try {
      const Model = await modelFor(object.apiVersion, object.kind);
      new Model(object).validate();
      console.log(`valid ${name}`);
    } catch (error) {
      failed = true;
      console.log(`INVALID ${name}: ${error.message}`);
    }
  }
}
process.exit(failed ? 1 : 0);
