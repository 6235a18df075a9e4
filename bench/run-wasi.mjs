// Runs a wasm32-wasip1 program under Node's V8 (the engine Envoy's Wasm uses),
// e.g. the stream micro-benchmark built as wasm:
//   node bench/run-wasi.mjs path/to/stream_bench.wasm [args...]
import { readFile } from "node:fs/promises";
import { WASI } from "node:wasi";
import { argv, env, exit } from "node:process";

const [path, ...args] = argv.slice(2);
if (!path) {
  console.error("usage: node bench/run-wasi.mjs PROGRAM.wasm [ARGS...]");
  exit(2);
}
// WASI_PREOPEN=/some/dir opens that directory to the program (same path inside).
const preopens = env.WASI_PREOPEN ? { [env.WASI_PREOPEN]: env.WASI_PREOPEN } : {};
const wasi = new WASI({ version: "preview1", args: [path, ...args], env, preopens });
const module = await WebAssembly.compile(await readFile(path));
// tollgate's proxy-wasm host imports are linked but never called here: stub them.
const imports = wasi.getImportObject();
for (const imp of WebAssembly.Module.imports(module)) {
  if (imp.kind === "function" && !(imports[imp.module] && imports[imp.module][imp.name])) {
    imports[imp.module] ??= {};
    imports[imp.module][imp.name] = () => {
      throw new Error(`host call ${imp.module}.${imp.name} is not available here`);
    };
  }
}
const instance = await WebAssembly.instantiate(module, imports);
// The library's proxy-wasm entry point (`_initialize`) is exported too; WASI
// `start` wants a command module, so hand it only what a command has.
const { memory, _start } = instance.exports;
exit(wasi.start({ exports: { memory, _start } }) ?? 0);
