// Reference Durable Streams server (@durable-streams/server), file-backed.
//
//   node reference-server.mjs [dataDir] [port]
//
// Environment (positional arguments win):
//   REFERENCE_DATA_DIR         data directory (file-backed storage); required unless given as argv[2]
//   REFERENCE_PORT / PORT      port to listen on (default 0: pick a free port)
//   REFERENCE_HOST             host (default 127.0.0.1)
//   STREAMS_LONG_POLL_TIMEOUT_MS  long-poll timeout in ms (default 500)
//
// Once listening, prints the base URL (e.g. http://127.0.0.1:4437) on a line of its own on stdout
// (the store's own start-up log lines come before it; take the first line starting with http://),
// then serves until SIGTERM/SIGINT.
import { mkdirSync } from "node:fs";
import { resolve } from "node:path";
import { DurableStreamTestServer } from "@durable-streams/server";

const dataDirArg = process.argv[2] ?? process.env.REFERENCE_DATA_DIR;
if (!dataDirArg) {
  console.error("usage: node reference-server.mjs <dataDir> [port]  (or REFERENCE_DATA_DIR)");
  process.exit(2);
}
const dataDir = resolve(dataDirArg);
mkdirSync(dataDir, { recursive: true });

const port = Number.parseInt(
  process.argv[3] ?? process.env.REFERENCE_PORT ?? process.env.PORT ?? "0",
  10,
);
const host = process.env.REFERENCE_HOST ?? "127.0.0.1";
const longPollTimeout = Number.parseInt(process.env.STREAMS_LONG_POLL_TIMEOUT_MS ?? "500", 10);

const server = new DurableStreamTestServer({ dataDir, port, host, longPollTimeout });
const url = await server.start();
console.log(url);

let stopping = false;
async function shutdown() {
  if (stopping) return;
  stopping = true;
  try {
    await server.stop();
  } finally {
    process.exit(0);
  }
}
process.on("SIGTERM", shutdown);
process.on("SIGINT", shutdown);
