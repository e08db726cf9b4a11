// Durable Streams server conformance suite (@durable-streams/server-conformance-tests).
//
// The package's own CLI (`npx @durable-streams/server-conformance-tests --run URL`) finds no
// test files here because vitest excludes node_modules/, so this project-local file calls the
// exported runner instead:
//
//   CONFORMANCE_TEST_URL=http://127.0.0.1:PORT npx vitest run conformance.test.mjs
//
// CONFORMANCE_LONG_POLL_TIMEOUT_MS must match (or exceed) the server's long-poll timeout.
import { runConformanceTests } from "@durable-streams/server-conformance-tests";

const baseUrl = process.env.CONFORMANCE_TEST_URL;
if (!baseUrl) {
  throw new Error(
    "CONFORMANCE_TEST_URL is required, e.g. CONFORMANCE_TEST_URL=http://127.0.0.1:4437",
  );
}

const longPollTimeoutMs = Number.parseInt(
  process.env.CONFORMANCE_LONG_POLL_TIMEOUT_MS ?? "500",
  10,
);

runConformanceTests({ baseUrl, longPollTimeoutMs });
