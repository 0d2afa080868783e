// Who is using the page: the answer of GET /api/v1/whoami, and what that role may do.
// The UI only leaves out what a role may not do; the API refuses it anyway.

import { api } from "./api.js";

const RANK = { viewer: 1, publisher: 1, operator: 2, admin: 3, service: 4 };

export const session = {
  /** `{name, role, via}` or null before the first answer / when logged out. */
  user: null,
};

/** Does the current user have `role` (viewer < operator < admin)? */
export function may(role) {
  return !!session.user && (RANK[session.user.role] || 0) >= (RANK[role] || 99);
}

/** Ask who we are: the user, or null when the API wants a login (401). */
export async function whoami() {
  try {
    session.user = await api("GET", "/api/v1/whoami", { quiet401: true });
  } catch (e) {
    if (e.status !== 401) throw e;
    session.user = null;
  }
  return session.user;
}

export async function login(username, password) {
  session.user = await api("POST", "/api/v1/login", {
    body: { username, password }, quiet401: true,
  });
  // The login answers name and role; whoami adds how we came (a session now).
  return whoami();
}

export async function logout() {
  try {
    await api("POST", "/api/v1/logout", { quiet401: true });
  } finally {
    session.user = null;
  }
}
