// Runs a Python file under the 32-bit MicroPython webassembly port (npm package
// @micropython/micropython-webassembly-pyscript), for bench/heap_factor.py.
//
// Usage: node heap_factor.mjs SCRIPT.py [--put HOST_PATH=VFS_PATH ...] [--heapsize BYTES] [--step]
// --put copies a host file into the interpreter's in-memory filesystem first (folders are
// made as needed). --step: after the script, run `step()` as separate top-level code until it
// returns False. This port's gc.collect() only marks a collection pending; it happens when a
// top-level call returns to JavaScript, so heap_workload.py measures one step per call.
// Python's stdout goes to stdout, its stderr to stderr. Exit status: 0, 1 if the Python code
// raised, 2 on a usage error, 3 if the package is not installed.
import { readFileSync } from "node:fs";
import { dirname } from "node:path";

const PACKAGE = "@micropython/micropython-webassembly-pyscript";

function usage(message) {
  process.stderr.write(`${message}\nusage: node heap_factor.mjs SCRIPT.py [--put HOST=VFS ...] [--heapsize BYTES] [--step]\n`);
  process.exit(2);
}

const args = process.argv.slice(2);
let script = null;
let heapsize = 1024 * 1024;
let stepping = false;
let done = false;
const MAX_STEPS = 100000;
const puts = [];
for (let i = 0; i < args.length; i++) {
  if (args[i] === "--put") {
    const spec = args[++i] || "";
    const eq = spec.indexOf("=");
    if (eq < 1) usage(`--put needs HOST_PATH=VFS_PATH, got ${JSON.stringify(spec)}`);
    puts.push([spec.slice(0, eq), spec.slice(eq + 1)]);
  } else if (args[i] === "--heapsize") {
    heapsize = Number(args[++i]);
    if (!Number.isInteger(heapsize) || heapsize < 16384) usage("--heapsize needs an integer >= 16384");
  } else if (args[i] === "--step") {
    stepping = true;
  } else if (script === null) {
    script = args[i];
  } else {
    usage(`unexpected argument ${JSON.stringify(args[i])}`);
  }
}
if (script === null) usage("no script given");

let loadMicroPython;
try {
  ({ loadMicroPython } = await import(PACKAGE));
} catch (e) {
  process.stderr.write(`cannot load ${PACKAGE} (${e.code || e.message}): run \`cd bench && npm ci\`\n`);
  process.exit(3);
}

const mp = await loadMicroPython({
  heapsize,
  stdout: (line) => {
    if (line === "DONE") done = true;
    process.stdout.write(line + "\n");
  },
  stderr: (line) => process.stderr.write(line + "\n"),
});

function mkdirs(path) {
  let sofar = "";
  for (const part of path.split("/").filter(Boolean)) {
    sofar += "/" + part;
    try {
      mp.FS.mkdir(sofar);
    } catch (e) {
      // EEXIST: already there
    }
  }
}

for (const [host, vfs] of puts) {
  mkdirs(dirname(vfs));
  mp.FS.writeFile(vfs, readFileSync(host));
}

try {
  mp.runPython(readFileSync(script, "utf8"));
  if (stepping) {
    let steps = 0;
    while (!done) {
      mp.runPython("step()");
      if (++steps > MAX_STEPS) throw new Error(`no DONE after ${MAX_STEPS} calls of step()`);
    }
  }
} catch (e) {
  // A Python exception: its traceback was already printed to stderr by the interpreter.
  process.stderr.write(`python raised: ${e.message || e}\n`);
  process.exit(1);
}
