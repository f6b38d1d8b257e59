// Records (write) or checks (check) which sources the committed bundle was built from:
// airflow_remote_execution/www/build-info.json holds a SHA-256 over the build's inputs and one of
// the bundle. tests/plane/api/test_ui_bundle.py computes the same in Python, so the test suite fails
// when a source changed without `npm run build`, or when the bundle was edited by hand.
import { createHash } from "node:crypto";
import { readdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join, relative, sep } from "node:path";

const UI = import.meta.dirname;
const OUT = join(UI, "..", "airflow_remote_execution", "www");
const INPUTS = ["package.json", "package-lock.json", "tsconfig.json", "vite.config.ts", "src"];

function files(path) {
  return statSync(path).isDirectory() ? readdirSync(path).flatMap((name) => files(join(path, name))) : [path];
}

const sha256 = (data) => createHash("sha256").update(data).digest("hex");

export function sourcesDigest() {
  const paths = INPUTS.flatMap((p) => files(join(UI, p)))
    .map((p) => relative(UI, p).split(sep).join("/"))
    .sort();
  return sha256(paths.map((p) => `${p}\0${sha256(readFileSync(join(UI, p)))}\n`).join(""));
}

const info = {
  sources_sha256: sourcesDigest(),
  bundle_sha256: sha256(readFileSync(join(OUT, "remote-agents.js"))),
};
const path = join(OUT, "build-info.json");
if (process.argv[2] === "write") {
  writeFileSync(path, JSON.stringify(info, null, 2) + "\n");
  console.log(`wrote ${relative(process.cwd(), path)}`);
} else {
  const recorded = JSON.parse(readFileSync(path, "utf8"));
  if (recorded.sources_sha256 !== info.sources_sha256 || recorded.bundle_sha256 !== info.bundle_sha256) {
    console.error("The committed bundle does not match ui/: run `npm run build --prefix ui` and commit the result.");
    process.exit(1);
  }
  console.log("bundle up to date");
}
