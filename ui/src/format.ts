export function age(seconds: number | null | undefined): string {
  if (seconds === null || seconds === undefined) return "never";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m ago`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h ago`;
}

export function duration(seconds: number | null | undefined): string {
  return seconds === null || seconds === undefined ? "-" : age(seconds).replace(/ ago$/, "");
}

/** "2026-12-05 08:42:53" in the browser's time zone (the format of Airflow's own pages). */
export function when(iso: string | null | undefined): string {
  return exactTime(iso).replace(/\.\d{3}$/, "");
}

export function exactTime(iso: string | null | undefined): string {
  if (!iso) return "-";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  const pad = (n: number, w = 2) => String(n).padStart(w, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

/** "+1.234 s" from ``from`` to ``to`` (ISO strings), or "" when either is missing. */
export function delta(from: string | null, to: string | null): string {
  if (!from || !to) return "";
  const ms = new Date(to).getTime() - new Date(from).getTime();
  if (Number.isNaN(ms)) return "";
  const sign = ms < 0 ? "-" : "+";
  const abs = Math.abs(ms);
  return abs < 1000 ? `${sign}${abs} ms` : `${sign}${(abs / 1000).toFixed(3)} s`;
}
