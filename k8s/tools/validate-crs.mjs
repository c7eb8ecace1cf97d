// Validates custom resources (KEDA ScaledObject, prometheus-operator PrometheusRule and
// ServiceMonitor) against the models that npm's @kubernetes-models packages generate from the
// projects' Go API types:
//   1. the package's own validate() (types, required fields, formats), and
//   2. strictness: every field must be declared by the type (the package validators accept
//      unknown fields; the fields are read from the package's .d.ts class declarations).
// Usage: node validate-crs.mjs <npm prefix> <resources.json>   (JSON array of {file, doc})
// Exit status 1 if any resource is invalid or of a kind this script does not know.
import { readFileSync, existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { pathToFileURL } from "node:url";

const [npmPrefix, input] = process.argv.slice(2);
const models = join(npmPrefix, "node_modules", "@kubernetes-models");

const KINDS = {
  "keda.sh/v1alpha1/ScaledObject": "keda/keda.sh/v1alpha1/ScaledObject",
  "keda.sh/v1alpha1/TriggerAuthentication": "keda/keda.sh/v1alpha1/TriggerAuthentication",
  "monitoring.coreos.com/v1/PrometheusRule": "prometheus-operator/monitoring.coreos.com/v1/PrometheusRule",
  "monitoring.coreos.com/v1/ServiceMonitor": "prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor",
  "monitoring.coreos.com/v1/PodMonitor": "prometheus-operator/monitoring.coreos.com/v1/PodMonitor",
};

// --- .d.ts class reader --------------------------------------------------------------------
const classes = new Map();
function readClass(dts) {
  if (classes.has(dts)) return classes.get(dts);
  let result = null;
  if (existsSync(dts)) {
    const text = readFileSync(dts, "utf8");
    const imports = new Map();
    for (const m of text.matchAll(/^import \{ (\w+) \} from "([^"]+)";$/gm)) {
      const spec = m[2];
      const file = spec.startsWith(".")
        ? join(dirname(dts), spec.replace(/\.js$/, ".d.ts"))
        : join(npmPrefix, "node_modules", spec + ".d.ts");
      imports.set(m[1], file);
    }
    const lines = text.split("\n");
    const start = lines.findIndex((l) => /^export declare class \w+ extends Model</.test(l));
    if (start >= 0) {
      const props = new Map();
      for (let i = start + 1; i < lines.length && lines[i] !== "}"; i++) {
        const m = lines[i].match(/^    "([^"]+)"\??: (.*)$/);
        if (!m) continue;
        let type = m[2];
        if (type === "{") {
          type = "{map}";
          while (i < lines.length && lines[i] !== "    };") i++;
        }
        props.set(m[1], type.replace(/;$/, ""));
      }
      result = { props, imports };
    }
  }
  classes.set(dts, result);
  return result;
}

function check(value, dts, path, errors) {
  const cls = readClass(dts);
  if (!cls || value === null || typeof value !== "object" || Array.isArray(value)) return;
  for (const [key, child] of Object.entries(value)) {
    if (!cls.props.has(key)) {
      errors.push(`${path}.${key}: unknown field`);
      continue;
    }
    checkType(child, cls.props.get(key), cls.imports, `${path}.${key}`, errors);
  }
}

function checkType(value, type, imports, path, errors) {
  const array = type.match(/^Array<(\w+)>$/);
  if (array) {
    if (Array.isArray(value) && imports.has(array[1])) {
      value.forEach((item, i) => check(item, imports.get(array[1]), `${path}[${i}]`, errors));
    }
    return;
  }
  if (imports.has(type)) check(value, imports.get(type), path, errors);
}

// --- main ------------------------------------------------------------------------------------
const resources = JSON.parse(readFileSync(input, "utf8"));
let failed = 0;
for (const { file, doc } of resources) {
  const id = `${file}: ${doc.kind}/${doc.metadata?.name}`;
  const module = KINDS[`${doc.apiVersion}/${doc.kind}`];
  if (!module) {
    console.log(`FAIL ${id}: no schema for ${doc.apiVersion} ${doc.kind}`);
    failed++;
    continue;
  }
  const errors = [];
  try {
    const mod = await import(pathToFileURL(join(models, module + ".js")).href);
    const Model = mod[doc.kind];
    new Model(doc).validate();
  } catch (e) {
    errors.push(e.message);
  }
  check(doc, join(models, module + ".d.ts"), doc.kind, errors);
  if (errors.length) {
    failed++;
    for (const e of errors) console.log(`FAIL ${id}: ${e}`);
  } else {
    console.log(`ok   ${id}`);
  }
}
process.exit(failed ? 1 : 0);
