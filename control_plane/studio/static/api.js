// The REST API, with the signed-in token (kept in sessionStorage for the tab's life).
const KEY = "specmesh.studio.token";

export class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.code = err.code || "http_" + status;
    this.issues = err.issues || [];
  }
}

export const session = {
  get token() { return sessionStorage.getItem(KEY); },
  set token(v) { v ? sessionStorage.setItem(KEY, v) : sessionStorage.removeItem(KEY); },
  me: null,
  can(action) { return !!(this.me && this.me.can.includes(action)); },
};

let onUnauthenticated = () => {};
export function setUnauthenticatedHandler(fn) { onUnauthenticated = fn; }

export async function api(method, path, body, token = session.token) {
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  const text = await r.text();
  try { data = text ? JSON.parse(text) : null; } catch { data = { error: { message: text } }; }
  if (!r.ok) {
    const e = new ApiError(r.status, data);
    if (r.status === 401 && token === session.token) onUnauthenticated(e);
    throw e;
  }
  return data;
}

export const get = (path) => api("GET", path);

/** A query string; a list value is repeated (``groupBy=agent&groupBy=model``). */
export const q = (params) => {
  const s = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    for (const x of Array.isArray(v) ? v : [v]) if (x != null && x !== "") s.append(k, x);
  }
  const t = s.toString();
  return t ? "?" + t : "";
};

const PAGE_SIZE = 1000;

/**
 * Every item of a paged list: the answer is ``{<key>: [...], nextPageToken}`` (the proto's
 * List RPCs); pages are followed until ``nextPageToken`` is empty.
 */
export async function listAll(path, key, params = {}) {
  const items = [];
  let pageToken = "";
  do {
    const page = await get(path + q({ ...params, pageSize: PAGE_SIZE, pageToken }));
    items.push(...(page[key] || []));
    pageToken = page.nextPageToken || "";
  } while (pageToken);
  return items;
}

/** An int64 of the proto's JSON (a string, or absent for 0) as a number. */
export const int = (v) => Number(v || 0);
export const enc = encodeURIComponent;
