/*
 * Realplexor JavaScript client: a WebSocket, else an event stream
 * (EventSource), where the browser has one and the server offers it, else
 * long polling over cross-origin fetch.
 *
 *   var rpl = new Dklab_Realplexor("https://rpl.example.com/", "demo_");
 *   rpl.subscribe("Alpha", function (data, id, cursor) { ... });
 *   rpl.onReset(function (id, cursor) { ... });  // optional: messages up to cursor were lost
 *   rpl.execute();
 *
 * The server serves this file at /?identifier=SCRIPT with the dollar
 * placeholders below replaced by its configuration. Loaded as a plain static
 * file they stay as they are, and the defaults apply.
 *
 * One request at a time carries every subscribed channel with the last
 * cursor seen on it ("identifier=CURSOR:ID,ID2,..."); after each answer the
 * client dispatches the parts and reconnects with the new cursors. Cursors
 * are kept as the strings the server sent: a double cannot tell two
 * consecutive server cursors apart. An event stream carries the same parts,
 * one per event; when it fails before it ever opened (a server or proxy
 * that refuses it) the client long-polls for the rest of the page's life.
 * Every new request starts from the cursors seen, whatever the transport.
 *
 * No IFRAME and no document.domain: the WAIT line answers CORS.
 */
(function (global) {
  "use strict";

  // A placeholder the server did not fill in still starts with a dollar.
  function text(value, fallback) {
    return value.charAt(0) === "$" ? fallback : value;
  }

  function number(value, fallback) {
    var parsed = parseFloat(text(value, ""));
    return isNaN(parsed) || parsed < 0 ? fallback : parsed;
  }

  var CONFIG = {
    waitTimeout: number("$WAIT_TIMEOUT", 300),          // seconds the server holds a poll
    maxBounces: number("$JS_MAX_BOUNCES", 10),          // failures in a row before the longest delay
    reconnectDelay: number("$JS_WAIT_RECONNECT_DELAY", 0.01), // seconds between polls
    waitUri: text("$JS_WAIT_URI", "/"),                  // WAIT path, relative to the client URL
    identifier: text("$IDENTIFIER", "identifier"),       // the marker word before "="
    debug: text("$JS_DEBUG", "false") === "true"
  };

  // What the server offers besides long polls (STREAM_TRANSPORTS): a server
  // that offers no event stream is not asked for one.
  var TRANSPORTS = text("$STREAM_TRANSPORTS", "eventsource").split(",");

  var VERSION = "2.0";
  var MAX_GET_URL = 1500;       // longer URLs go as POST bodies
  var FIRST_RETRY_DELAY = 0.1;  // seconds; doubled for each failure in a row
  var MAX_RETRY_DELAY = 5;      // seconds; the longest wait between failing polls
  var SOCKET_OPEN_MS = 10000;     // a WebSocket not open by then is given up for the next transport
  var SERVER_CURSOR_AGE = 86400; // seconds: a cursor this close to now is the server's clock
  var WATCHDOG_MARGIN = 30;     // seconds past WAIT_TIMEOUT before a silent poll is dropped

  function debug() {
    if (CONFIG.debug && global.console) {
      global.console.log.apply(global.console, ["Realplexor:"].concat([].slice.call(arguments)));
    }
  }

  // Report an error without stopping the caller: it reaches window.onerror
  // and the console like any uncaught exception. reportError keeps the
  // message even when this script comes from another origin (a rethrow
  // from here would show as "Script error." there).
  function report(error) {
    if (typeof global.reportError === "function") {
      global.reportError(error);
    } else {
      setTimeout(function () { throw error; }, 0);
    }
  }

  // Compare two decimal cursor strings ("DIGITS[.DIGITS]") exactly: -1, 0 or 1.
  function compareCursors(a, b) {
    var pa = String(a).split("."), pb = String(b).split(".");
    var ia = pa[0].replace(/^0+(?=\d)/, ""), ib = pb[0].replace(/^0+(?=\d)/, "");
    if (ia.length !== ib.length) return ia.length < ib.length ? -1 : 1;
    if (ia !== ib) return ia < ib ? -1 : 1;
    var fa = pa[1] || "", fb = pb[1] || "";
    var width = Math.max(fa.length, fb.length);
    while (fa.length < width) fa += "0";
    while (fb.length < width) fb += "0";
    return fa === fb ? 0 : (fa < fb ? -1 : 1);
  }

  function isCursor(value) {
    return /^\d+(\.\d+)?$/.test(String(value));
  }

  function resolve(uri, base) {
    var page = global.location ? global.location.href : undefined;
    return new URL(uri, new URL(base, page)).href;
  }

  // Constructor. url: the Realplexor server (its WAIT line), e.g.
  // "https://rpl.example.com/"; namespace: a prefix added to every id on the
  // wire and stripped again before callbacks see it.
  function Dklab_Realplexor(url, namespace) {
    if (!(this instanceof Dklab_Realplexor)) return new Dklab_Realplexor(url, namespace);
    this.version = VERSION;
    this._waitUrl = resolve(CONFIG.waitUri, url || "/");
    this._namespace = namespace == null ? "" : String(namespace);
    this._login = null;
    // { id without prefix: { cursor: "DIGITS.DIGITS" or null, callbacks: [fn, ...] } }
    this._map = {};
    this._prefix = null;      // set by the IFRAME bridge: the old client's own prefix
    this._caller = null;      // set by the IFRAME bridge: calls a callback across frames
    this._request = null;     // the poll in flight: { identifier, controller, watchdog }
    this._timer = null;       // the next poll, when one is scheduled
    this._failures = 0;       // failed polls in a row
    this._dispatching = false;
    this._resetCallbacks = [];
    this._cursorsSet = false; // setCursor() since the stream opened
    this._streamRefused = !global.EventSource || TRANSPORTS.indexOf("eventsource") < 0;
    this._socketRefused = !global.WebSocket || TRANSPORTS.indexOf("websocket") < 0;
  }

  Dklab_Realplexor.VERSION = VERSION;
  Dklab_Realplexor.config = CONFIG;
  Dklab_Realplexor.compareCursors = compareCursors;

  // Set the login. As in the original client, it is one more id prefix:
  // with logon("user") and namespace "demo_", "Alpha" is "user_demo_Alpha"
  // on the wire, the channels a back end logged in as "user" may publish
  // to. The WAIT line ignores credentials, so no password is ever sent.
  Dklab_Realplexor.prototype.logon = function (login) {
    this._login = login == null ? null : String(login);
    return this;
  };

  // Listen to id from cursor on (e.g. 0 to replay the server's whole queue).
  // Takes effect on the next execute().
  Dklab_Realplexor.prototype.setCursor = function (id, cursor) {
    this._entry(id).cursor = cursor == null ? null : String(cursor);
    this._cursorsSet = true;
    return this;
  };

  // Add callback(id, cursor), called when the server no longer held every
  // message of a subscribed id after its cursor (MAX_DATA_FOR_ID or
  // CLEAN_ID_AFTER dropped them): those up to cursor were lost. Messages
  // after it follow as usual.
  Dklab_Realplexor.prototype.onReset = function (callback) {
    if (typeof callback === "function" && this._resetCallbacks.indexOf(callback) < 0) {
      this._resetCallbacks.push(callback);
    }
    return this;
  };

  // Add callback(data, id, cursor) for id; call execute() to apply.
  Dklab_Realplexor.prototype.subscribe = function (id, callback) {
    var chain = this._entry(id).callbacks;
    if (typeof callback === "function" && chain.indexOf(callback) < 0) chain.push(callback);
    return this;
  };

  // Remove callback from id, or every callback of id when it is null.
  // It is not called any more at once; execute() stops listening to id.
  Dklab_Realplexor.prototype.unsubscribe = function (id, callback) {
    var entry = this._map[id];
    if (!entry) return this;
    if (callback == null) {
      entry.callbacks = [];
    } else {
      var at = entry.callbacks.indexOf(callback);
      if (at >= 0) entry.callbacks.splice(at, 1);
    }
    return this;
  };

  // Apply subscriptions: start polling, or reconnect when the channels or
  // cursors to ask for changed. Inside a callback it does nothing more: the
  // client reconnects with the current subscriptions once the answer is
  // dispatched. Calls in a row make one request.
  Dklab_Realplexor.prototype.execute = function () {
    if (this._dispatching || this._timer !== null) return this;
    if (this._request !== null) {
      if (this._request.socket && this._resubscribe(this._request)) return this;
      if (this._request.source ? !this._cursorsSet && this._request.channels === this._channels()
          : this._request.identifier === this._identifier()) return this;
      debug("subscriptions changed, reconnecting");
      this._abort();
    }
    this._schedule(0);
    return this;
  };

  // How this client listens now: "websocket", "eventsource", "longpoll",
  // or "" while it has no request open.
  Dklab_Realplexor.prototype.transport = function () {
    var request = this._request;
    if (!request) return "";
    return request.socket ? "websocket" : request.source ? "eventsource" : "longpoll";
  };

  Dklab_Realplexor.prototype._entry = function (id) {
    if (!Object.prototype.hasOwnProperty.call(this._map, id)) {
      this._map[id] = { cursor: null, callbacks: [] };
    }
    return this._map[id];
  };

  Dklab_Realplexor.prototype._wirePrefix = function () {
    if (this._prefix !== null) return this._prefix;
    return (this._login != null ? this._login + "_" : "") + this._namespace;
  };

  // "CURSOR:PREFIXid,PREFIXid2,..." for every id that has a callback; "" for none.
  Dklab_Realplexor.prototype._identifier = function () {
    var prefix = this._wirePrefix(), items = [];
    for (var id in this._map) {
      if (!Object.prototype.hasOwnProperty.call(this._map, id)) continue;
      var entry = this._map[id];
      if (!entry || !entry.callbacks || !entry.callbacks.length) continue;
      var cursor = entry.cursor;
      items.push((cursor != null && isCursor(cursor) ? cursor + ":" : "") + prefix + id);
    }
    return items.join(",");
  };

  // The subscribed ids on the wire, without cursors: what a stream listens to.
  Dklab_Realplexor.prototype._channels = function () {
    return this._identifier().replace(/(^|,)[\d.]+:/g, "$1");
  };

  Dklab_Realplexor.prototype._schedule = function (seconds) {
    var self = this;
    if (this._timer !== null) clearTimeout(this._timer);
    this._timer = setTimeout(function () {
      self._timer = null;
      self._connect();
    }, Math.round(seconds * 1000));
  };

  Dklab_Realplexor.prototype._abort = function () {
    var request = this._request;
    this._request = null;
    if (request && request.socket) {
      clearTimeout(request.watchdog);
      request.socket.close();
    } else if (request && request.source) {
      request.source.close();
    } else if (request) {
      clearTimeout(request.watchdog);
      request.controller.abort();
    }
  };

  Dklab_Realplexor.prototype._connect = function () {
    var identifier = this._identifier();
    if (!identifier) {
      debug("nothing subscribed, not polling");
      return;
    }
    var self = this;
    var marker = encodeURIComponent(CONFIG.identifier);
    var joint = this._waitUrl.indexOf("?") < 0 ? "?" : "&";
    // reset=1: the server tells of lost messages (see onReset); old servers ignore it.
    var url = this._waitUrl + joint + marker + "=" + identifier + "&ncrnd=" + Date.now()
      + Math.floor(Math.random() * 1e6) + "&reset=1";
    // A WebSocket first, then an event stream (only a GET); the IFRAME bridge keeps long polling.
    if (!this._socketRefused && this._caller === null && url.length <= MAX_GET_URL) {
      this._openSocket(identifier, url.replace(/^http/, "ws"));
      return;
    }
    if (!this._streamRefused && this._caller === null && url.length <= MAX_GET_URL) {
      this._openStream(identifier, url);
      return;
    }
    var options = { method: "GET", cache: "no-store", credentials: "omit", mode: "cors" };
    if (url.length > MAX_GET_URL) {
      url = this._waitUrl + joint + "reset=1";
      options.method = "POST";
      options.headers = { "Content-Type": "application/x-www-form-urlencoded" };
      options.body = marker + "=" + identifier + "\n";
    }
    var request = { identifier: identifier, controller: new AbortController(), watchdog: null };
    options.signal = request.controller.signal;
    request.watchdog = setTimeout(function () {
      if (self._request === request) {
        debug("no answer in time, dropping the poll");
        self._abort();
        self._failed(new Error("no answer within " + (CONFIG.waitTimeout + WATCHDOG_MARGIN) + " s"));
      }
    }, (CONFIG.waitTimeout + WATCHDOG_MARGIN) * 1000);
    this._request = request;
    var started = Date.now();
    debug(options.method, identifier);
    global.fetch(url, options).then(function (response) {
      if (response.status !== 200) throw new Error("WAIT line answered HTTP " + response.status);
      return response.text();
    }).then(function (body) {
      if (self._request !== request) return;
      self._request = null;
      clearTimeout(request.watchdog);
      self._answered(body, Date.now() - started);
    }, function (error) {
      if (self._request !== request) return;   // aborted on purpose
      self._request = null;
      clearTimeout(request.watchdog);
      self._failed(error);
    });
  };

  // The WebSocket: one message per part. Subscriptions made after it opened
  // are sent on it; one that never opened is given up for the next transport.
  Dklab_Realplexor.prototype._openSocket = function (identifier, url) {
    var self = this;
    var request = { identifier: identifier, channels: this._channels(), socket: null, opened: false };
    this._cursorsSet = false;
    try {
      request.socket = new global.WebSocket(url);
    } catch (error) {
      this._socketRefused = true;
      this._schedule(0);
      return;
    }
    this._request = request;
    debug("websocket", identifier);
    // A proxy that drops the upgrade hands the server a plain poll, and the
    // handshake waits for nothing: give it up for the next transport.
    request.watchdog = setTimeout(function () {
      if (self._request !== request || request.opened) return;
      debug("websocket did not open in time, trying the next transport");
      self._request = null;
      self._socketRefused = true;
      try { request.socket.close(); } catch (error) { /* closing anyway */ }
      self._schedule(0);
    }, SOCKET_OPEN_MS);
    request.socket.onopen = function () {
      if (self._request !== request) return;
      clearTimeout(request.watchdog);
      request.opened = true;
      self._failures = 0;
      self._resubscribe(request);
    };
    request.socket.onmessage = function (event) {
      if (self._request !== request) return;
      self._dispatchOne(event.data);
      if (self._request === request) self._resubscribe(request);
    };
    request.socket.onclose = function () {
      if (self._request !== request) return;
      clearTimeout(request.watchdog);
      self._request = null;
      if (!request.opened) {
        debug("websocket refused, trying the next transport");
        self._socketRefused = true;
        self._schedule(0);
      } else {
        self._failed(new Error("websocket closed"));
      }
    };
  };

  // One part, as a stream's event or a WebSocket's message carries it.
  Dklab_Realplexor.prototype._dispatchOne = function (text) {
    var part;
    try {
      part = JSON.parse(text);
    } catch (error) {
      report(new Error("unreadable part: " + error.message));
      return;
    }
    this._dispatching = true;
    try {
      this._dispatch([part]);
    } catch (error) {
      report(error);
    } finally {
      this._dispatching = false;
    }
  };

  // Tell an open WebSocket of subscriptions changed since it opened; false
  // when it cannot (not open yet, or cursors set by hand: reconnect then).
  Dklab_Realplexor.prototype._resubscribe = function (request) {
    if (!request.opened || this._cursorsSet) return false;
    var now = this._channels();
    if (now === request.channels) return true;
    var before = request.channels ? request.channels.split(",") : [];
    var after = now ? now.split(",") : [];
    var prefix = this._wirePrefix(), added = {}, gone = [], any = false;
    for (var i = 0; i < after.length; i++) {
      if (before.indexOf(after[i]) >= 0) continue;
      var entry = this._map[after[i].substring(prefix.length)];
      added[after[i]] = entry && entry.cursor != null && isCursor(entry.cursor) ? entry.cursor : null;
      any = true;
    }
    for (var j = 0; j < before.length; j++) {
      if (after.indexOf(before[j]) < 0) gone.push(before[j]);
    }
    if (any) request.socket.send(JSON.stringify({ subscribe: added }));
    if (gone.length) request.socket.send(JSON.stringify({ unsubscribe: gone }));
    request.channels = now;
    return true;
  };

  // The stream: one event per part. The browser reconnects a stream that
  // broke after it opened (its Last-Event-ID carries the cursors); one that
  // never opened is given up for long polling.
  Dklab_Realplexor.prototype._openStream = function (identifier, url) {
    var self = this;
    var request = { identifier: identifier, channels: this._channels(), source: null, opened: false };
    this._cursorsSet = false;
    try {
      request.source = new global.EventSource(url);
    } catch (error) {
      this._streamRefused = true;
      this._schedule(0);
      return;
    }
    this._request = request;
    debug("stream", identifier);
    request.source.onopen = function () {
      if (self._request !== request) return;
      request.opened = true;
      self._failures = 0;
    };
    request.source.onmessage = function (event) {
      if (self._request !== request) return;
      self._dispatchOne(event.data);
      // Subscriptions changed in a callback: listen to them now.
      if (self._request === request && request.channels !== self._channels()) {
        self._abort();
        self._schedule(0);
      }
    };
    request.source.onerror = function () {
      if (self._request !== request) return;
      if (!request.opened) {
        debug("event stream refused, long polling instead");
        self._streamRefused = true;
        self._abort();
        self._schedule(0);
      } else if (request.source.readyState === 2) {
        self._abort();
        self._failed(new Error("event stream closed"));
      }
    };
  };

  Dklab_Realplexor.prototype._answered = function (body, elapsedMs) {
    body = body.replace(/^\s+|\s+$/g, "");
    if (!body) {
      // The server's WAIT_TIMEOUT passed. An empty answer that comes back
      // at once is not normal (a proxy, a server going down): back off.
      if (elapsedMs < Math.min(1, CONFIG.waitTimeout / 2) * 1000) {
        this._failed(new Error("empty answer after " + elapsedMs + " ms"));
      } else {
        this._failures = 0;
        this._schedule(CONFIG.reconnectDelay);
      }
      return;
    }
    var parts;
    try {
      parts = JSON.parse(body);
      if (!Array.isArray(parts)) throw new Error("not an array");
    } catch (error) {
      this._failed(new Error("unreadable answer: " + error.message));
      return;
    }
    this._failures = 0;
    this._dispatching = true;
    try {
      this._dispatch(parts);
    } catch (error) {
      report(error);   // the loop goes on whatever the answer held
    } finally {
      this._dispatching = false;
    }
    this._schedule(CONFIG.reconnectDelay);
  };

  // Delay before the next poll after the given failures in a row: doubling
  // from FIRST_RETRY_DELAY, at most MAX_RETRY_DELAY, and the longest once
  // JS_MAX_BOUNCES failures passed. A little jitter keeps many clients of a
  // restarted server from coming back at the same instant.
  function retryDelay(failures) {
    var delay = failures > CONFIG.maxBounces ? MAX_RETRY_DELAY
      : Math.min(MAX_RETRY_DELAY, FIRST_RETRY_DELAY * Math.pow(2, failures - 1));
    return CONFIG.reconnectDelay + delay * (1 + Math.random() * 0.2);
  }

  Dklab_Realplexor.prototype._failed = function (error) {
    this._failures += 1;
    var delay = retryDelay(this._failures);
    debug("poll failed (" + (error && error.message) + "), retry in " + delay.toFixed(2) + " s");
    this._schedule(delay);
  };

  // Call back once per part for each subscribed id the part names, with
  // that id's cursor; parts come ordered by cursor. A part at or before the
  // cursor already seen on an id is not delivered twice.
  Dklab_Realplexor.prototype._dispatch = function (parts) {
    var prefix = this._wirePrefix();
    var newest = null;
    for (var i = 0; i < parts.length; i++) {
      var part = parts[i];
      if (!part || typeof part.ids !== "object" || part.ids === null) continue;
      var reset = part.reset === true;
      for (var wireId in part.ids) {
        if (!Object.prototype.hasOwnProperty.call(part.ids, wireId)) continue;
        if (wireId.slice(0, prefix.length) !== prefix) continue;
        var id = wireId.slice(prefix.length);
        var entry = Object.prototype.hasOwnProperty.call(this._map, id) ? this._map[id] : null;
        var cursor = String(part.ids[wireId]);
        // A cut's cursor is of a message dropped perhaps long ago: not "now".
        if (!reset && isCursor(cursor) && (newest === null || compareCursors(cursor, newest) > 0)) newest = cursor;
        if (!entry || !isCursor(cursor)) continue;
        if (entry.cursor != null && isCursor(entry.cursor) && compareCursors(cursor, entry.cursor) <= 0) continue;
        entry.cursor = cursor;
        if (reset) {
          // Messages up to cursor were lost; what follows comes after it.
          if (!entry.callbacks.length) continue;
          var resets = this._resetCallbacks.slice();
          for (var k = 0; k < resets.length; k++) this._call(resets[k], [id, cursor]);
          continue;
        }
        var callbacks = entry.callbacks.slice();
        for (var j = 0; j < callbacks.length; j++) {
          // A callback unsubscribed by an earlier one is not called.
          if (entry.callbacks.indexOf(callbacks[j]) < 0) continue;
          this._call(callbacks[j], [part.data, id, cursor]);
        }
      }
    }
    this._adoptNewest(newest);
  };

  // A channel without a cursor listens "from now", and "now" of the next
  // poll is a little after this answer: what was published in between
  // would be missed. Such channels listen from this answer's newest cursor
  // instead, when it is a server cursor (the Unix time); a publisher's own
  // small cursors say nothing about the other channels.
  Dklab_Realplexor.prototype._adoptNewest = function (newest) {
    if (newest === null || parseFloat(newest) < Date.now() / 1000 - SERVER_CURSOR_AGE) return;
    for (var id in this._map) {
      if (!Object.prototype.hasOwnProperty.call(this._map, id)) continue;
      var entry = this._map[id];
      if (entry && entry.cursor == null && entry.callbacks && entry.callbacks.length) entry.cursor = newest;
    }
  };

  Dklab_Realplexor.prototype._call = function (callback, args) {
    if (this._caller) {
      var failure = this._caller(callback, args);
      if (failure != null) report(new Error(String(failure)));
      return;
    }
    try {
      callback.apply(null, args);
    } catch (error) {
      report(error);
    }
  };

  // The bridge for pages that still use the original client: it loads the
  // IFRAME page from the server and calls, inside it,
  // Dklab_Realplexor_Loader.execute(map, callAndReturnException, prefix),
  // where map is that page's own { id: { cursor, callbacks } }.
  var bridge = null;
  var Loader = {
    execute: function (map, caller, prefix) {
      if (!bridge) bridge = new Dklab_Realplexor(global.location ? global.location.href : "/");
      bridge._map = map;
      bridge._caller = typeof caller === "function" ? caller : null;
      bridge._prefix = prefix == null ? "" : String(prefix);
      bridge.execute();
    }
  };

  global.Dklab_Realplexor = Dklab_Realplexor;
  global.Dklab_Realplexor_Loader = Loader;
  if (typeof module === "object" && module && module.exports) module.exports = Dklab_Realplexor;
})(typeof window !== "undefined" ? window : this);
