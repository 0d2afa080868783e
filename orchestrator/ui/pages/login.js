// Login: POST /api/v1/login sets the session cookie (HttpOnly: this code never sees it).

import { h, replace } from "../lib/dom.js";
import { session, login } from "../lib/session.js";

export const title = "Log in";

export function render(view, ctx) {
  const error = h("p", { class: "form-error", id: "login-error", role: "alert", hidden: true });
  const user = h("input", { id: "username", name: "username", autocomplete: "username", required: true, autofocus: true });
  const pass = h("input", { id: "password", name: "password", type: "password", autocomplete: "current-password", required: true });
  const submit = h("button", { type: "submit", class: "btn primary wide" }, "Log in");
  const form = h("form", { class: "card login", novalidate: true },
    h("h1", {}, "Log in to Nexus"),
    session.user && session.user.via !== "anonymous"
      ? h("p", { class: "muted" }, `You are logged in as ${session.user.name}; logging in again switches user.`)
      : session.user
        ? h("p", { class: "muted" }, "You are looking as an anonymous viewer. Log in to do more.")
        : null,
    h("label", { for: "username" }, "User name"), user,
    h("label", { for: "password" }, "Password"), pass,
    error,
    submit,
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!user.value || !pass.value) {
      replace(error, "Enter your user name and password.");
      error.hidden = false;
      return;
    }
    submit.disabled = true;
    error.hidden = true;
    try {
      await login(user.value.trim(), pass.value);
      ctx.navigate(ctx.afterLogin());
    } catch (err) {
      replace(error, err.status === 401 ? "The user name or password is wrong." : err.message);
      error.hidden = false;
      pass.select();
    } finally {
      submit.disabled = false;
    }
  });
  view.append(h("section", { class: "page center" }, form));
  user.focus();
}
