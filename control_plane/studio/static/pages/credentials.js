// Credentials: references with masked values; write-only entry of a new value into Vault.
import { api, listAll, session } from "../api.js";
import { h, clear, card, table, badge, toast, errorBox } from "../ui.js";

export async function render() {
  const creds = await listAll("/api/v1/credentials", "credentials");
  const canWrite = session.can("credentials.write");
  const state = { path: "", field: "value", value: "" };
  const status = h("div", {});
  const value = h("input", { class: "input", type: "password", id: "cred-value", autocomplete: "new-password", "data-testid": "cred-value", onInput: (e) => { state.value = e.target.value; } });
  const form = h("form", {
    class: "form-grid", onSubmit: async (e) => {
      e.preventDefault();
      try {
        const { credential: r } = await api("PUT", "/api/v1/credentials", { ...state });
        value.value = ""; state.value = "";
        toast(`Stored ${r.reference} (version ${r.version})`);
        clear(status, h("div", { class: "alert alert-ok" }, "Stored as ", h("code", {}, r.reference), ` — version ${r.version}. Use this reference in a spec; the value cannot be read back.`));
      } catch (err) { clear(status, errorBox(err)); }
    },
  },
    h("div", { class: "field" }, h("label", { class: "field-label", for: "cred-path" }, "Path"), h("p", { class: "help" }, "Under the KV mount, e.g. specmesh/shared/dashscope"),
      h("input", { class: "input", id: "cred-path", "data-testid": "cred-path", required: true, onInput: (e) => { state.path = e.target.value; } })),
    h("div", { class: "field" }, h("label", { class: "field-label", for: "cred-field" }, "Field"), h("p", { class: "help" }, "The key inside the secret"),
      h("input", { class: "input", id: "cred-field", value: "value", required: true, onInput: (e) => { state.field = e.target.value; } })),
    h("div", { class: "field field-wide" }, h("label", { class: "field-label", for: "cred-value" }, "New value"), h("p", { class: "help" }, "Write-only: sent once to Vault, never shown again, never logged."), value),
    h("div", { class: "field-wide form-actions" }, h("button", { class: "btn btn-primary", type: "submit", "data-testid": "cred-save" }, "Store in Vault")),
    h("div", { class: "field-wide" }, status));
  return h("div", { class: "page" },
    h("div", { class: "page-head" }, h("div", {}, h("h1", {}, "Credentials"),
      h("p", { class: "muted" }, "Secrets live in Vault. Specs hold only vault:// references; values are write-only, for everyone."))),
    h("div", { class: "grid-2 wide-left" },
      card("References", table([
        { label: "Reference", render: (c) => h("code", { class: "clip", title: c.reference }, c.reference) },
        { label: "Value", render: (c) => h("span", { class: "masked", "data-testid": "masked" }, c.maskedValue) },
        { label: "Version", class: "num", render: (c) => badge(`v${c.version}`) },
      ], creds, { empty: "No secrets under specmesh/." }), { subtitle: `${creds.length} references under specmesh/` }),
      canWrite ? card("Write a new value", form) : null));
}
