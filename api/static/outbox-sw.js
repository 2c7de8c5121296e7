/*
 * outbox-sw.js: the service worker that shows outbox's Web Push notifications.
 *
 * Registered by outbox-push.js, or pulled into a site's own service worker with
 * importScripts("/static/outbox-sw.js") (a page has one worker per scope).
 *
 * push: the payload is the JSON that the dispatcher renders from
 * templates/push/<name>.json.j2:
 *     {title, body, icon?, badge?, tag?, data: {url, tag?, ack_url?, open_url?}}
 * and is shown with showNotification(title, {body, icon, badge, data, tag, renotify}).
 * The tag is the payload's "tag", else data.tag: a notification with the tag of one
 * already shown replaces it (a collapsed alert: the newer price, the same ticket) and
 * alerts again (renotify). Without a tag every push is a notification of its own.
 * A payload that is not our JSON still shows a notification (Chromium requires one
 * for every push, userVisibleOnly), with its text as the body.
 *
 * notificationclick: focuses a window of this origin already at data.url, else opens
 * data.url in a new one (for an alert, data.url is its acknowledgement link).
 *
 * self.outboxPush exposes the pure parts (payload to notification, the click's
 * target) for tests and for a site's own worker.
 */
"use strict";

(() => {
  const FALLBACK_TITLE = "New notification";

  function isObject(value) {
    return value !== null && typeof value === "object" && !Array.isArray(value);
  }

  function text(value) {
    return typeof value === "string" ? value : "";
  }

  /** The push message's JSON object; {body: its text} when it is not JSON. */
  function parsePayload(data) {
    if (!data) return {};
    try {
      const value = data.json();
      return isObject(value) ? value : {};
    } catch (_) {
      return { body: data.text() };
    }
  }

  /** showNotification's arguments for a payload: {title, options}. */
  function notificationOf(payload) {
    const data = isObject(payload.data) ? payload.data : {};
    const options = { body: text(payload.body), data };
    if (text(payload.icon)) options.icon = payload.icon;
    if (text(payload.badge)) options.badge = payload.badge;
    const tag = text(payload.tag) || text(data.tag);
    if (tag) {
      options.tag = tag;
      options.renotify = payload.renotify !== false;
    }
    return { title: text(payload.title) || FALLBACK_TITLE, options };
  }

  /** The absolute http(s) URL a click opens, or null (no url, or another scheme). */
  function targetUrl(data) {
    const raw = isObject(data) ? text(data.url) : "";
    if (!raw) return null;
    let url;
    try {
      url = new URL(raw, self.location.href);
    } catch (_) {
      return null;
    }
    return url.protocol === "https:" || url.protocol === "http:" ? url.href : null;
  }

  /** Focus the window already at the notification's URL, else open one. */
  async function openUrl(notification, clients) {
    const url = targetUrl(notification.data);
    if (url === null) return null;
    const windows = await clients.matchAll({ type: "window", includeUncontrolled: true });
    const open = windows.find((client) => client.url === url);
    if (open !== undefined) return open.focus();
    return clients.openWindow(url);
  }

  self.addEventListener("push", (event) => {
    const { title, options } = notificationOf(parsePayload(event.data));
    event.waitUntil(self.registration.showNotification(title, options));
  });

  self.addEventListener("notificationclick", (event) => {
    event.notification.close();
    event.waitUntil(openUrl(event.notification, self.clients));
  });

  // Registered as itself (not imported into a site's worker): a new version takes
  // over at once rather than after every tab of the site has closed.
  if (/\/outbox-sw\.js$/.test(self.location.pathname)) {
    self.addEventListener("install", () => self.skipWaiting());
    self.addEventListener("activate", (event) => event.waitUntil(self.clients.claim()));
  }

  self.outboxPush = Object.freeze({ FALLBACK_TITLE, parsePayload, notificationOf, targetUrl, openUrl });
})();
