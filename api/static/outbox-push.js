/*
 * outbox-push.js: subscribe this browser to outbox's Web Push notifications (ES module).
 *
 *     import { subscribe, unsubscribe } from "/static/outbox-push.js";
 *     await subscribe({ token });    // on a click: asks permission, then subscribes
 *     await unsubscribe({ token });
 *
 * subscribe() asks the notification permission, registers the service worker
 * (/static/outbox-sw.js), reads the VAPID public key (GET
 * /api/v1/push/vapid-public-key), subscribes with
 * pushManager.subscribe({userVisibleOnly: true, applicationServerKey}) and sends
 * subscription.toJSON() to POST /api/v1/push/subscriptions. Called again it sends the
 * browser's current subscription again (the API keeps one row per endpoint), so a page
 * may call it on every load once the permission is granted; a subscription made with
 * another key (the server's key was rotated) is replaced, and so is one whose endpoint
 * another user of this browser holds (409 on sending it). A new subscription that the
 * API refuses (400, 409, 413, 422) is dropped from the browser too; on any other
 * failure the browser keeps it and the next call sends it again.
 *
 * unsubscribe() sends DELETE /api/v1/push/subscriptions {endpoint}, then unsubscribes
 * the browser, also when the API could not be told (the push service then answers
 * 410 for that endpoint, and the dispatcher drops it); the API's failure is thrown
 * after that.
 *
 * Options (every function): token: the user's bearer token (a JWT with role "user"),
 * a string or a function returning one (or a promise of one); apiBase: where the API
 * is ("" = this origin); workerUrl (default "/static/outbox-sw.js"); scope: the
 * worker's scope (default "/static/outbox/", so it never replaces a site's own worker;
 * the API allows any scope of the origin). Errors are OutboxPushError with a reason:
 * "unsupported", "permission", "worker" or "api" (with .status, 0 without an answer).
 */

export const WORKER_URL = "/static/outbox-sw.js";
export const SCOPE = "/static/outbox/";
const KEY_PATH = "/api/v1/push/vapid-public-key";
const SUBSCRIPTIONS_PATH = "/api/v1/push/subscriptions";
// the API's answers to a subscription it will not keep (409: the user has too many)
const REFUSED = [400, 409, 413, 422];

export class OutboxPushError extends Error {
  constructor(reason, message, status = 0) {
    super(message);
    this.name = "OutboxPushError";
    this.reason = reason;
    this.status = status;
  }
}

/** Whether this browser can receive Web Push (service workers, PushManager, Notification). */
export function isSupported() {
  return (
    typeof navigator !== "undefined" &&
    "serviceWorker" in navigator &&
    typeof PushManager !== "undefined" &&
    typeof Notification !== "undefined"
  );
}

/** The permission so far: "granted", "denied", "default", or "unsupported". */
export function permission() {
  return isSupported() ? Notification.permission : "unsupported";
}

/** Register the worker and resolve once it is active (pushManager needs an active one). */
export async function registerWorker({ workerUrl = WORKER_URL, scope = SCOPE } = {}) {
  requireSupport();
  let registration;
  try {
    registration = await navigator.serviceWorker.register(workerUrl, { scope });
  } catch (error) {
    throw new OutboxPushError("worker", `the service worker did not register: ${error}`);
  }
  await activated(registration);
  return registration;
}

/** This browser's subscription under `scope`, or null. */
export async function currentSubscription({ scope = SCOPE } = {}) {
  if (!isSupported()) return null;
  const registration = await navigator.serviceWorker.getRegistration(scope);
  // getRegistration answers the registration whose scope covers `scope`: a site's own
  // worker at "/" when ours is not registered; its subscription is not ours to touch
  if (!registration || registration.scope !== new URL(scope, location.href).href) return null;
  return registration.pushManager.getSubscription();
}

/** Ask permission, subscribe, and send the subscription to the API; returns it. */
export async function subscribe(options = {}) {
  requireSupport();
  const granted = await Notification.requestPermission();
  if (granted !== "granted") {
    throw new OutboxPushError("permission", `notifications are ${granted} for this site`);
  }
  const registration = await registerWorker(options);
  const answer = await call(options, "GET", KEY_PATH);
  const body = await answer.json().catch(() => ({}));
  if (typeof body.key !== "string" || body.key === "") {
    throw new OutboxPushError("api", "the API sent no VAPID public key", answer.status);
  }
  const key = keyBytes(body.key);
  let subscription = await registration.pushManager.getSubscription();
  if (subscription !== null && !sameKey(subscription.options.applicationServerKey, key)) {
    await forget(options, subscription);
    subscription = null;
  }
  if (subscription !== null) {
    try {
      await call(options, "POST", SUBSCRIPTIONS_PATH, subscription.toJSON());
      return subscription;
    } catch (error) {
      // Kept for the next call to send again (the API may know it already), unless
      // another user of this browser holds its endpoint (409: the API keeps it
      // theirs): a new subscription has an endpoint of its own.
      if (error.status !== 409) throw error;
      await subscription.unsubscribe();
    }
  }
  subscription = await registration.pushManager.subscribe({
    userVisibleOnly: true,
    applicationServerKey: key,
  });
  try {
    await call(options, "POST", SUBSCRIPTIONS_PATH, subscription.toJSON());
  } catch (error) {
    // a new subscription the API refuses would never receive anything; on a failure
    // that may pass (network, 5xx, an expired token) the next call sends it again
    if (REFUSED.includes(error.status)) await subscription.unsubscribe().catch(() => false);
    throw error;
  }
  return subscription;
}

/** Remove the subscription from the API, then from the browser; false when there was none. */
export async function unsubscribe(options = {}) {
  const subscription = await currentSubscription(options);
  if (subscription === null) return false;
  await forget(options, subscription);
  return true;
}

async function forget(options, subscription) {
  let failure = null;
  try {
    await call(options, "DELETE", SUBSCRIPTIONS_PATH, { endpoint: subscription.endpoint }, [404]);
  } catch (error) {
    failure = error;
  }
  await subscription.unsubscribe();
  if (failure !== null) throw failure;
}

function requireSupport() {
  if (!isSupported()) {
    throw new OutboxPushError("unsupported", "this browser cannot receive push notifications");
  }
}

function activated(registration) {
  if (registration.active) return Promise.resolve(registration); // pushManager needs no more
  const worker = registration.installing || registration.waiting;
  if (worker === null) {
    return Promise.reject(new OutboxPushError("worker", "the service worker is gone"));
  }
  if (worker.state === "activated") return Promise.resolve(registration);
  return new Promise((resolve, reject) => {
    worker.addEventListener("statechange", () => {
      if (worker.state === "activated") resolve(registration);
      if (worker.state === "redundant") {
        reject(new OutboxPushError("worker", "the service worker failed to install"));
      }
    });
  });
}

async function call(options, method, path, body, alsoFine = []) {
  const token = typeof options.token === "function" ? await options.token() : options.token;
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(`${options.apiBase || ""}${path}`, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (error) {
    throw new OutboxPushError("api", `${method} ${path}: ${error}`);
  }
  if (!response.ok && !alsoFine.includes(response.status)) {
    const detail = await response
      .json()
      .then((answer) => answer.detail || JSON.stringify(answer))
      .catch(() => response.statusText);
    throw new OutboxPushError("api", `${method} ${path}: ${response.status} ${detail}`, response.status);
  }
  return response;
}

/** Bytes of a base64url string (the VAPID key's form on the wire). */
export function keyBytes(base64url) {
  const base64 = base64url.replace(/-/g, "+").replace(/_/g, "/");
  const raw = atob(base64 + "=".repeat((4 - (base64.length % 4)) % 4));
  return Uint8Array.from(raw, (char) => char.charCodeAt(0));
}

function sameKey(buffer, key) {
  if (!buffer) return false;
  const bytes = new Uint8Array(buffer);
  return bytes.length === key.length && bytes.every((byte, i) => byte === key[i]);
}
