// Calls to the page API with the browser's Airflow session (its cookie), from the page's own origin.
import { useCallback, useEffect, useRef, useState } from "react";

export class ApiError extends Error {
  constructor(
    public status: number,
    message: string,
  ) {
    super(message);
  }
}

/** The Airflow UI's base path (``[api] base_url``), from the page's <base href>. */
export function basePath(): string {
  const href = document.querySelector("head > base")?.getAttribute("href") ?? "/";
  return new URL(href, globalThis.location.origin).pathname.replace(/\/$/, "");
}

/** The plane's public URL as agents would use it (``[remote_execution] api_url``). */
export function planeUrl(): string {
  return globalThis.location.origin + basePath();
}

export async function call<T>(method: string, path: string, body?: unknown): Promise<T> {
  const response = await fetch(`${basePath()}/remote_execution/ui/api${path}`, {
    method,
    credentials: "same-origin",
    headers: body === undefined ? { Accept: "application/json" } : { Accept: "application/json", "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let data: unknown = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const detail = (data as { detail?: unknown } | null)?.detail;
    const message =
      typeof detail === "string" ? detail : detail ? JSON.stringify(detail) : `${response.status} ${response.statusText}`;
    throw new ApiError(response.status, message);
  }
  return data as T;
}

export interface Poll<T> {
  data: T | null;
  error: ApiError | Error | null;
  loadedAt: number | null;
  reload: () => void;
}

/** GET ``path`` now and every ``intervalMs`` (while the tab is visible); ``reload`` asks again at once. */
export function usePoll<T>(path: string, intervalMs: number): Poll<T> {
  const [data, setData] = useState<T | null>(null);
  const [error, setError] = useState<Error | null>(null);
  const [loadedAt, setLoadedAt] = useState<number | null>(null);
  const generation = useRef(0);

  const load = useCallback(() => {
    const mine = ++generation.current;
    call<T>("GET", path).then(
      (result) => {
        if (mine !== generation.current) return;
        setData(result);
        setError(null);
        setLoadedAt(Date.now());
      },
      (e: Error) => {
        if (mine !== generation.current) return;
        setError(e);
      },
    );
  }, [path]);

  useEffect(() => {
    load();
    const timer = setInterval(() => {
      if (document.visibilityState !== "hidden") load();
    }, intervalMs);
    return () => {
      clearInterval(timer);
      generation.current++;
    };
  }, [load, intervalMs]);

  return { data, error, loadedAt, reload: load };
}
