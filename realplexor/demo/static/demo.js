/*
 * The sandbox page. Two "browsers" in one page:
 *  - Channels: listens through Dklab_Realplexor (the WAIT line) to the
 *    open channels and to the online list the back end publishes;
 *  - Post: sends the form to this site's back end (POST /api/send), which
 *    publishes over the IN line.
 * Everything shown is built with DOM nodes and textContent: messages come
 * from anyone.
 */
(function () {
  "use strict";

  var settings = window.SANDBOX;
  var NAME_RE = /^[A-Za-z0-9_]+$/;
  var MAX_NAME = 64;
  var MAX_MESSAGES = 50;          // per channel pane; older ones are dropped

  var realplexor = new Dklab_Realplexor(settings.waitUrl, settings.namespace);
  // { channel name: { pane: element, list: element, callback: function } }, in opening order
  var open = {};
  var onlineVersion = -1;
  function $(id) { return document.getElementById(id); }

  function element(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text != null) node.textContent = text;
    return node;
  }

  // Why a channel name cannot be used, or null. The back end says the same.
  function nameProblem(name) {
    if (!NAME_RE.test(name)) return "invalid channel name '" + name + "': use letters, digits and _ only";
    if (name.length > MAX_NAME) return "channel name " + name.slice(0, 20) + "... is too long (at most " + MAX_NAME + " characters)";
    if (name === settings.onlineId) return settings.onlineId + " is reserved for the online list; pick another name";
    return null;
  }

  // "Alpha, Beta" -> {ids: ["Alpha", "Beta"]} or {error: "..."}.
  function parseIds(text) {
    var ids = [];
    var items = String(text).split(",");
    for (var i = 0; i < items.length; i++) {
      var name = items[i].trim();
      if (!name) continue;
      var problem = nameProblem(name);
      if (problem) return { error: problem };
      if (ids.indexOf(name) < 0) ids.push(name);
    }
    if (!ids.length) return { error: "name at least one channel to send to" };
    if (ids.length > settings.maxIds) return { error: "too many channels: at most " + settings.maxIds + " in one message" };
    return { ids: ids };
  }

  // ---- showing data: strings as text, objects and arrays as a tree ----

  function renderValue(value) {
    if (Array.isArray(value)) {
      var list = element("ol", "tree tree-array");
      value.forEach(function (item) {
        var entry = element("li");
        entry.appendChild(renderValue(item));
        list.appendChild(entry);
      });
      if (!value.length) list.appendChild(element("li", "tree-empty", "(empty list)"));
      return list;
    }
    if (value !== null && typeof value === "object") {
      var dl = element("dl", "tree tree-object");
      Object.keys(value).forEach(function (key) {
        dl.appendChild(element("dt", null, key));
        var dd = element("dd");
        dd.appendChild(renderValue(value[key]));
        dl.appendChild(dd);
      });
      if (!Object.keys(value).length) dl.appendChild(element("dd", "tree-empty", "(empty object)"));
      return dl;
    }
    if (typeof value === "string") return element("span", "value-string", value);
    return element("span", "value-" + (value === null ? "null" : typeof value), String(value));
  }

  function authorOf(data) {
    return data !== null && typeof data === "object" && !Array.isArray(data)
      && typeof data.author === "string" ? data.author : null;
  }

  function isPlainPost(data) {
    return authorOf(data) !== null && typeof data.text === "string"
      && Object.keys(data).length === 2;
  }

  function cursorTime(cursor) {
    var date = new Date(parseFloat(cursor) * 1000);
    return isNaN(date.getTime()) ? "" : date.toLocaleTimeString();
  }

  // ---- the Channels pane ----

  function showMessage(name, data, cursor) {
    var channel = open[name];
    if (!channel) return;
    var item = element("li", "message");
    item.setAttribute("data-cursor", cursor);
    var meta = element("div", "meta");
    meta.appendChild(element("span", "message-channel", name));
    var author = authorOf(data);
    if (author !== null) meta.appendChild(element("span", "message-author", author));
    var time = element("time", "message-time", cursorTime(cursor));
    time.setAttribute("datetime", new Date(parseFloat(cursor) * 1000).toISOString());
    time.title = "cursor " + cursor;
    meta.appendChild(time);
    item.appendChild(meta);
    var body = element("div", "message-body");
    // A plain post ({author, text}) reads as a chat line; anything else as a tree.
    body.appendChild(isPlainPost(data) ? element("span", "value-string", data.text) : renderValue(data));
    item.appendChild(body);
    var cursorNode = element("div", "message-cursor", cursor);
    cursorNode.title = "cursor: this message's position in the channel";
    item.appendChild(cursorNode);
    prepend(channel, item);
    channel.pane.classList.remove("fresh");
    void channel.pane.offsetWidth;   // restart the highlight animation
    channel.pane.classList.add("fresh");
  }

  // Put a notice or message on top of a channel's list, keeping the list short.
  function prepend(channel, item) {
    channel.list.insertBefore(item, channel.list.firstChild);
    while (channel.list.children.length > MAX_MESSAGES) channel.list.removeChild(channel.list.lastChild);
  }

  // The server dropped messages of a channel before this page got them (it
  // keeps only the latest MAX_DATA_FOR_ID). The client asks again from the
  // cut, so what the server still holds comes next, above the notice.
  function showCut(name, cursor) {
    if (name === settings.onlineId) {
      loadOnline();   // the whole list again, as at start
      return;
    }
    var channel = open[name];
    if (!channel) return;
    var notice = element("li", "history-cut",
      "Some messages on " + name + " were lost while this page was away; "
      + "the latest the server kept appear above.");
    notice.setAttribute("data-reset", cursor);
    notice.setAttribute("role", "status");
    notice.title = "messages up to cursor " + cursor + " were dropped";
    prepend(channel, notice);
  }

  function addChannel(name) {
    if (open[name]) return false;
    var pane = element("article", "channel");
    pane.setAttribute("data-id", name);
    var head = element("header", "channel-head");
    head.appendChild(element("h3", null, name));
    var close = element("button", "channel-close", "×");
    close.type = "button";
    close.title = "Close " + name + " (unsubscribe)";
    close.setAttribute("aria-label", "Close " + name);
    close.addEventListener("click", function () { closeChannel(name); });
    head.appendChild(close);
    pane.appendChild(head);
    var list = element("ol", "messages");
    pane.appendChild(list);
    pane.appendChild(element("p", "waiting", "Waiting for messages…"));
    $("channels").appendChild(pane);

    var callback = function (data, id, cursor) {
      showMessage(id, data, cursor);
    };
    open[name] = { pane: pane, list: list, callback: callback };
    // Listen from now on, also when the channel was open before.
    realplexor.setCursor(name, null).subscribe(name, callback);
    return true;
  }

  function closeChannel(name) {
    var channel = open[name];
    if (!channel) return;
    realplexor.unsubscribe(name, channel.callback).execute();
    channel.pane.parentNode.removeChild(channel.pane);
    delete open[name];
    channelsChanged();
  }

  // Keep the address (?ids=...) and the empty-state note in step with the open channels.
  function channelsChanged() {
    var names = Object.keys(open);
    $("no-channels").hidden = names.length > 0;
    if (window.history && window.history.replaceState) {
      var url = new URL(window.location.href);
      url.searchParams.set("ids", names.join(","));
      window.history.replaceState(null, "", url.pathname + "?" + url.searchParams.toString().replace(/%2C/g, ","));
    }
  }

  function openFromForm(event) {
    event.preventDefault();
    var input = $("add-id");
    var name = input.value.trim();
    var problem = name ? nameProblem(name) : "type a channel name first";
    if (!problem && open[name]) problem = name + " is already open";
    $("add-error").textContent = problem ? problem.charAt(0).toUpperCase() + problem.slice(1) + "." : "";
    if (problem) return;
    addChannel(name);
    realplexor.execute();
    input.value = "";
    channelsChanged();
  }

  // ---- Online now ----

  function showOnline(snapshot) {
    if (!snapshot || typeof snapshot.version !== "number" || snapshot.version <= onlineVersion) return;
    onlineVersion = snapshot.version;
    var list = $("online");
    while (list.firstChild) list.removeChild(list.firstChild);
    var channels = snapshot.channels || {};
    var names = Object.keys(channels).sort();
    names.forEach(function (name) {
      var count = channels[name];
      var item = element("li", count > 0 ? "online-item" : "online-item leaving");
      item.setAttribute("data-id", name);
      item.setAttribute("data-count", String(count));
      var button = element("button", "online-name", name);
      button.type = "button";
      button.title = open[name] ? name + " is open" : "Open " + name;
      button.addEventListener("click", function () {
        if (addChannel(name)) { realplexor.execute(); channelsChanged(); }
      });
      item.appendChild(button);
      item.appendChild(element("span", "online-count",
        count > 0 ? String(count) : "leaving"));
      item.title = count > 0 ? count + (count === 1 ? " listener" : " listeners")
        : "no listener; goes offline after the server's OFFLINE_TIMEOUT";
      list.appendChild(item);
    });
    $("online-empty").hidden = names.length > 0;
  }

  // The current list from the back end: at start, and after changes were lost.
  function loadOnline() {
    fetch("/api/online", { cache: "no-store" })
      .then(function (response) { return response.json(); })
      .then(showOnline, function () { /* the channel brings the next change */ });
  }

  function followOnline() {
    realplexor.subscribe(settings.onlineId, function (data, id, cursor) {
      showOnline(data);
    });
    // Later changes come through the channel above.
    loadOnline();
  }

  // ---- the Post pane ----

  function showPostResult(error, feedback) {
    $("post-error").textContent = error ? error.charAt(0).toUpperCase() + error.slice(1) + "." : "";
    $("post-feedback").textContent = feedback || "";
  }

  function post(event) {
    event.preventDefault();
    var parsed = parseIds($("post-ids").value);
    var text = $("post-text").value.trim();
    if (parsed.error) return showPostResult(parsed.error);
    if (!text) return showPostResult("write a message first: the text is empty");
    var button = $("post-send");
    button.disabled = true;
    showPostResult(null, "Sending…");
    fetch("/api/send", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ids: parsed.ids.join(","), text: text,
                             structured: $("post-structured").checked,
                             author: $("post-author").value })
    }).then(function (response) {
      return response.json().then(function (answer) {
        if (!response.ok) throw new Error(answer && answer.error ? answer.error : "HTTP " + response.status);
        return answer;
      }, function () { throw new Error("the back end answered HTTP " + response.status); });
    }).then(function (answer) {
      showPostResult(null, "Sent to " + answer.ids.join(", ") + " in one request.");
      $("post-text").value = "";
    }, function (error) {
      var message = error instanceof TypeError ? "cannot reach the sandbox's back end" : error.message;
      showPostResult(message);
    }).then(function () { button.disabled = false; });
  }

  function submitOnEnter(event) {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("post-form").requestSubmit();
    }
  }

  // ---- start ----

  function initialIds() {
    var given = new URLSearchParams(window.location.search).get("ids");
    if (given === null) return settings.defaultIds.slice();
    var ids = [], skipped = [];
    given.split(",").forEach(function (item) {
      var name = item.trim();
      if (!name) return;
      if (nameProblem(name)) skipped.push(name);
      else if (ids.indexOf(name) < 0) ids.push(name);
    });
    if (skipped.length) {
      $("add-error").textContent = "Skipped from the address (letters, digits and _ only): " + skipped.join(", ") + ".";
    }
    return ids;
  }

  // The status line: the WAIT line, and how this page listens to it now.
  function showTransport() {
    var transport = realplexor.transport ? realplexor.transport() : "";
    var node = $("connection");
    node.textContent = "WAIT line: " + settings.waitUrl + (transport ? " · " + transport : "");
    node.setAttribute("data-transport", transport);
  }

  function start() {
    var ids = initialIds();
    ids.forEach(addChannel);
    followOnline();
    realplexor.onReset(showCut);
    realplexor.execute();
    channelsChanged();
    $("post-ids").value = ids.join(",");
    showTransport();
    setInterval(showTransport, 1000);
    $("add-form").addEventListener("submit", openFromForm);
    $("post-form").addEventListener("submit", post);
    $("post-text").addEventListener("keydown", submitOnEnter);
    document.documentElement.setAttribute("data-ready", "true");
  }

  start();
})();
