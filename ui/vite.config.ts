// Builds the Remote Agents page as the library the Airflow 3.3 UI loads for a plugin's react_apps
// entry: one UMD file that sets globalThis.AirflowPlugin. React, its JSX runtime, Chakra UI and
// Emotion are the host page's own (globals it exposes), so the page follows Airflow's theme and the
// bundle carries only our code.
import { resolve } from "node:path";
import { defineConfig } from "vite";

const HOST_GLOBALS: Record<string, string> = {
  react: "React",
  "react-dom": "ReactDOM",
  "react/jsx-runtime": "ReactJSXRuntime",
  "@chakra-ui/react": "ChakraUI",
  "@emotion/react": "EmotionReact",
};

export default defineConfig({
  // The bundle is committed: the same sources must always give the same bytes.
  build: {
    // REX_UI_OUT_DIR: the bundle-freshness test rebuilds into a temporary directory.
    outDir: process.env.REX_UI_OUT_DIR || resolve(import.meta.dirname, "../airflow_remote_execution/www"),
    emptyOutDir: false,
    minify: true,
    sourcemap: false,
    reportCompressedSize: false,
    lib: {
      entry: resolve(import.meta.dirname, "src/main.tsx"),
      name: "AirflowPlugin",
      formats: ["umd"],
      fileName: () => "remote-agents.js",
    },
    rollupOptions: {
      external: Object.keys(HOST_GLOBALS),
      output: { globals: HOST_GLOBALS },
    },
  },
  define: { "process.env.NODE_ENV": JSON.stringify("production") },
  oxc: { jsx: { runtime: "automatic" } },
});
