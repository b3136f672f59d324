// Agent Studio: sign-in, the shell (navigation by role) and the hash router.
import { api, session, setUnauthenticatedHandler } from "./api.js";
import { h, clear, icon, errorBox, spinner } from "./ui.js";
import * as agents from "./pages/agents.js";
import * as prompts from "./pages/prompts.js";
import * as registries from "./pages/registries.js";
import * as releases from "./pages/releases.js";
import * as observability from "./pages/observability.js";
import * as credentials from "./pages/credentials.js";

const NAV = [
  { id: "agents", label: "Agents", icon: "agents", needs: "agents.read", page: agents },
  { id: "prompts", label: "Prompt Center", icon: "prompts", needs: "prompts.read", page: prompts },
  { id: "registries", label: "Registries", icon: "registries", needs: "registry.read", page: registries },
  { id: "releases", label: "Releases", icon: "releases", needs: "releases.read", page: releases },
  { id: "observability", label: "Observability", icon: "observability", needs: "traces.read", page: observability },
  { id: "credentials", label: "Credentials", icon: "credentials", needs: "credentials.list", page: credentials },
];

const root = document.getElementById("app");
let generation = 0;

function signIn(message) {
  session.token = null;
  session.me = null;
  const input = h("input", { class: "input", type: "password", id: "token", name: "token", autocomplete: "off", placeholder: "smt_…", required: true });
  const status = h("div", { class: "signin-status" }, message ? errorBox({ message }) : null);
  const form = h("form", {
    class: "signin-card", "data-testid": "signin",
    onSubmit: async (e) => {
      e.preventDefault();
      const token = input.value.trim();
      clear(status, spinner("Signing in…"));
      try {
        session.me = await api("GET", "/api/v1/whoami", undefined, token);
        session.token = token;
        if (!location.hash || location.hash === "#/signin") location.hash = "#/agents";
        render();
      } catch (err) {
        clear(status, errorBox(err.status === 401 ? { message: "That token is not known to this control plane." } : err));
      }
    },
  },
    h("div", { class: "brand brand-lg" }, h("span", { class: "logo" }, "◆"), h("span", {}, "specmesh"), h("span", { class: "brand-sub" }, "Studio")),
    h("p", { class: "muted" }, "Sign in with an API token. Your role decides what you can see and change."),
    h("label", { class: "field-label", for: "token" }, "API token"), input,
    h("p", { class: "help" }, "A local fleet writes its admin token to <home>/admin-token. The token stays in this browser tab only."),
    h("button", { class: "btn btn-primary btn-block", type: "submit" }, "Sign in"),
    status);
  clear(root, h("div", { class: "signin" }, form));
  input.focus();
}

setUnauthenticatedHandler(() => signIn("Your session ended: sign in again."));

function shell(active) {
  const me = session.me;
  const nav = h("nav", { class: "sidebar", "aria-label": "Main" },
    h("a", { class: "brand", href: "#/agents" }, h("span", { class: "logo" }, "◆"), h("span", {}, "specmesh"), h("span", { class: "brand-sub" }, "Studio")),
    h("ul", {}, NAV.filter((n) => session.can(n.needs)).map((n) => h("li", {},
      h("a", { href: `#/${n.id}`, class: n.id === active ? "active" : "", "data-nav": n.id }, icon(n.icon), n.label)))),
    h("div", { class: "sidebar-foot" },
      h("div", { class: "me" }, h("div", { class: "me-name", "data-testid": "me" }, me.name), h("div", { class: "me-roles" }, me.roles.join(" · "))),
      h("button", { class: "btn btn-sm btn-dark", onClick: () => { location.hash = ""; signIn(); } }, "Sign out")));
  const main = h("main", { class: "main", id: "main" });
  clear(root, h("div", { class: "layout" }, nav, main));
  return main;
}

async function render() {
  if (!session.token) return signIn();
  if (!session.me) {
    try { session.me = await api("GET", "/api/v1/whoami"); } catch (e) { return signIn(e.status === 401 ? "Sign in again." : e.message); }
  }
  const [, section = "agents", ...rest] = (location.hash || "#/agents").split("/");
  const entry = NAV.find((n) => n.id === section) || NAV[0];
  const main = shell(entry.id);
  const mine = ++generation;
  if (!session.can(entry.needs)) {
    clear(main, h("div", { class: "page" }, h("h1", {}, entry.label),
      h("div", { class: "alert alert-info", "data-testid": "forbidden" }, `Your role does not include ${entry.needs}.`)));
    return;
  }
  clear(main, spinner());
  try {
    const page = await entry.page.render(rest.map(decodeURIComponent), { stale: () => mine !== generation });
    if (mine === generation) clear(main, page);
  } catch (e) {
    if (mine === generation) clear(main, h("div", { class: "page" }, errorBox(e)));
  }
}

window.addEventListener("hashchange", render);
render();
