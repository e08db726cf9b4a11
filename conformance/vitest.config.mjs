import { defineConfig } from "vitest/config";

// Only the project-local conformance file; the suite's tests share one server, so run the file
// in a single fork and give slow (Postgres-backed) servers some headroom per test.
export default defineConfig({
  test: {
    include: ["conformance.test.mjs"],
    testTimeout: 30_000,
    hookTimeout: 30_000,
    pool: "forks",
    watch: false,
  },
});
