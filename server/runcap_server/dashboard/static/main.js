// The dashboard app: sign-in, the router (/, /runs/<id>, /showback) and the
// page frame. Each page is a View mounted into <main>.
import { ApiError, apiKey, getJson, onUnauthorized, setApiKey } from "./api.js";
import { h, replace } from "./dom.js";
import { RunView } from "./run.js";
import { RunsView } from "./runs.js";
import { ShowbackView } from "./showback.js";
const main = document.getElementById("main");
const signOut = document.getElementById("sign-out");
let config = { auth_required: true, tls: false, version: "" };
let current = null;
/** Asks for the API key once per tab; checks it can list runs (operator role). */
class LoginView {
    message;
    constructor(message) {
        this.message = message;
    }
    mount(root) {
        const input = h("input", {
            id: "api-key",
            name: "api-key",
            type: "password",
            autocomplete: "off",
            spellcheck: "false",
            required: true,
            "aria-describedby": "api-key-help",
        });
        const error = h("p", { class: "notice", role: "alert" }, this.message);
        const form = h("form", { class: "login" }, h("h1", null, "Sign in"), h("label", { for: "api-key" }, "API key"), input, h("p", { id: "api-key-help", class: "help" }, "A key of the operator role (runcap keys create NAME --role operator). It stays in this tab only."), h("button", { type: "submit" }, "Sign in"), error);
        form.addEventListener("submit", (event) => {
            event.preventDefault();
            void this.check(input.value.trim(), error);
        });
        replace(root, form);
        input.focus();
    }
    unmount() { }
    async check(key, error) {
        setApiKey(key);
        try {
            await getJson("/api/runs?since=1m");
            show();
        }
        catch (caught) {
            setApiKey(null);
            const failure = caught;
            error.textContent =
                failure.status === 401
                    ? "This key is not valid (unknown or revoked)."
                    : failure.status === 403
                        ? "This key may not use the dashboard: it needs the operator role (an agent key reaches only its own runs)."
                        : `Could not check the key: ${failure.message}`;
        }
    }
}
function route() {
    const path = location.pathname;
    const run = /^\/runs\/([^/]+)\/?$/.exec(path);
    if (run) {
        const runId = decodeURIComponent(run[1]);
        return { view: new RunView(runId), title: `Run ${runId}`, nav: "/" };
    }
    if (path === "/showback")
        return { view: new ShowbackView(), title: "Showback", nav: "/showback" };
    return { view: new RunsView(), title: "Active runs", nav: "/" };
}
function mount(view, title, nav) {
    current?.unmount();
    current = view;
    document.title = `${title} · runcap`;
    for (const link of document.querySelectorAll("nav a")) {
        if (link.getAttribute("href") === nav)
            link.setAttribute("aria-current", "page");
        else
            link.removeAttribute("aria-current");
    }
    view.mount(main);
}
function show(message = "") {
    const signedIn = !config.auth_required || apiKey() !== null;
    signOut.hidden = !(config.auth_required && signedIn);
    if (!signedIn) {
        mount(new LoginView(message), "Sign in", null);
        return;
    }
    const { view, title, nav } = route();
    mount(view, title, nav);
}
onUnauthorized((error) => {
    if (current instanceof LoginView)
        return;
    setApiKey(null);
    show(`Signed out: ${error.message}`);
});
signOut.addEventListener("click", () => {
    setApiKey(null);
    show();
});
// Links within the app change the page without a reload.
document.addEventListener("click", (event) => {
    const link = event.target.closest?.("a");
    if (!link || event.defaultPrevented || event.button !== 0)
        return;
    if (!link.getAttribute("href")?.startsWith("/"))
        return;
    if (event.metaKey || event.ctrlKey || event.shiftKey || event.altKey)
        return;
    const url = new URL(link.href, location.href);
    if (url.origin !== location.origin || link.target)
        return;
    event.preventDefault();
    if (url.pathname !== location.pathname)
        history.pushState(null, "", url.pathname);
    show();
    main.focus();
});
window.addEventListener("popstate", () => show());
async function start() {
    try {
        config = await getJson("/api/config");
    }
    catch (error) {
        replace(main, h("p", { class: "notice", role: "alert" }, `The dashboard cannot reach its server: ${error.message}`));
        return;
    }
    document.getElementById("version").textContent = config.version ? `runcap ${config.version}` : "";
    show();
}
void start();
