<?php
/**
 * Dklab_Realplexor: publish to a Realplexor server from PHP (the IN line).
 *
 * Usage:
 *
 *   require_once "Dklab/Realplexor.php";
 *   $rpl = new Dklab_Realplexor("127.0.0.1", 10010, "demo_");
 *   $rpl->logon("user", "secret");           // only with a USERS_FILE
 *   $rpl->send(array("Alpha", "Beta"), array("text" => "hello"));
 *   $rpl->send(array("Alpha" => $cursor), "at a cursor of my own");
 *   $rpl->send("Alpha", "only for friends", array("friends"));
 *   $ids    = $rpl->cmdOnline();              // array("Alpha", ...)
 *   $counts = $rpl->cmdOnlineWithCounters();  // array("Alpha" => 2, ...)
 *   $events = $rpl->cmdWatch($pos);           // array(array("event" => "online",
 *                                             //   "pos" => 12, "id" => "Alpha"), ...)
 *
 * Every request is one TCP connection (TLS when the port is 443). Any
 * failure, including a refusal by the server, throws
 * Dklab_Realplexor_Exception with the server's reason. The socket timeout
 * is PHP's default_socket_timeout.
 *
 * The namespace is prepended to every id sent (targets, showOnlyForIds,
 * prefixes) and stripped from the ids returned.
 *
 * Needs PHP 7 or later with the (built-in) json extension only.
 */

/**
 * Thrown on any failure to talk to Realplexor or any refusal by it.
 */
class Dklab_Realplexor_Exception extends Exception
{
}

/**
 * A client of the Realplexor IN line.
 */
class Dklab_Realplexor
{
    private $_host;
    private $_port;
    private $_namespace;
    private $_identifier;
    private $_login = null;
    private $_password = null;

    /**
     * @param string      $host       Realplexor's IN line host.
     * @param int         $port       Its port (443 means TLS).
     * @param string|null $namespace  Prefix added to every channel id.
     * @param string      $identifier The server's IDENTIFIER marker word.
     */
    public function __construct($host, $port, $namespace = null, $identifier = "identifier")
    {
        $this->_host = (string)$host;
        $this->_port = (int)$port;
        $this->_namespace = (string)$namespace;
        $this->_identifier = (string)$identifier;
    }

    /**
     * Send the following requests as a user of the server's USERS_FILE.
     * A logged-in client may only touch ids prefixed with "LOGIN_".
     *
     * @param string $login    Alphanumeric login.
     * @param string $password Its password.
     */
    public function logon($login, $password)
    {
        $login = (string)$login;
        $password = (string)$password;
        if (!preg_match('/^[A-Za-z0-9]+$/D', $login)) {
            throw new Dklab_Realplexor_Exception("Invalid login \"$login\": it must be alphanumeric");
        }
        if (preg_match('/[\s&;"\'<>]/', $password)) {
            throw new Dklab_Realplexor_Exception(
                "Invalid password for login $login: it cannot contain spaces or any of &;\"'<>"
            );
        }
        $this->_login = $login;
        $this->_password = $password;
    }

    /**
     * Publish $data to channels.
     *
     * @param mixed      $idsOrIdsToCursors An id, a list of ids, or a map id => cursor
     *                                      (a null cursor lets the server pick one).
     *                                      Integer keys are list positions, so
     *                                      the value is the id.
     * @param mixed      $data              Any value json_encode() accepts.
     * @param array|null $showOnlyForIds    Deliver only to clients that also listen
     *                                      to one of these ids.
     */
    public function send($idsOrIdsToCursors, $data, $showOnlyForIds = null)
    {
        $json = json_encode($data, JSON_UNESCAPED_UNICODE);
        if ($json === false) {
            throw new Dklab_Realplexor_Exception("Cannot encode the data as JSON: " . json_last_error_msg());
        }
        $items = array();
        foreach ((array)$idsOrIdsToCursors as $key => $value) {
            if (is_int($key)) {
                $items[] = $this->_channelId($value);
            } elseif ($value === null || $value === "") {
                $items[] = $this->_channelId($key);
            } else {
                $items[] = $this->_cursor($value) . ":" . $this->_channelId($key);
            }
        }
        foreach ((array)$showOnlyForIds as $id) {
            $items[] = "*" . $this->_channelId($id);
        }
        if (!$items) {
            throw new Dklab_Realplexor_Exception("No channel ids to send to");
        }
        $this->_request(implode(",", $items), $json);
    }

    /**
     * Ids of the channels online now (someone listens, or did a moment ago).
     *
     * @param array|string|null $idPrefixes Only ids starting with one of these.
     * @return array List of ids, namespace stripped.
     */
    public function cmdOnline($idPrefixes = null)
    {
        return array_map('strval', array_keys($this->cmdOnlineWithCounters($idPrefixes)));
    }

    /**
     * Online channels with their numbers of listeners (0 while a channel is
     * only waiting for its offline timeout).
     *
     * @param array|string|null $idPrefixes Only ids starting with one of these.
     * @return array Map id => count, namespace stripped from the ids.
     */
    public function cmdOnlineWithCounters($idPrefixes = null)
    {
        $words = array_merge(array("ONLINE"), $this->_prefixes($idPrefixes));
        $counters = array();
        foreach ($this->_commandLines(implode(" ", $words)) as $line) {
            if (!preg_match('/^(\S+)\s+(\d+)$/D', $line, $m)) {
                throw new Dklab_Realplexor_Exception("Cannot parse the ONLINE answer line \"$line\"");
            }
            $counters[$this->_stripNamespace($m[1])] = (int)$m[2];
        }
        return $counters;
    }

    /**
     * Channels that went online or offline after position $fromPos, oldest
     * first; each id once, with its latest event. With no position ($fromPos
     * 0, null, "" or not a number) the answer is a single entry with event
     * "FAKE" whose "pos" is the current position: start watching from there,
     * as in
     *
     *   $pos = 0;
     *   while (true) {
     *       foreach ($rpl->cmdWatch($pos) as $e) { $pos = $e["pos"]; ... }
     *       sleep(1);
     *   }
     *
     * A fresh server's position is 10, so cmdWatch(1) lists every event it
     * still keeps (at least the newest 3 * (EVENT_CHAIN_LEN + 1)).
     *
     * @param int|string|null   $fromPos    Position of the last event seen (0: none yet).
     * @param array|string|null $idPrefixes Only ids starting with one of these.
     * @return array List of array("event" => "online"|"offline"|"FAKE", "pos" => int, "id" => string).
     */
    public function cmdWatch($fromPos, $idPrefixes = null)
    {
        $words = array("WATCH");
        if (preg_match('/^\d+$/D', (string)$fromPos)) {
            $words[] = (string)$fromPos;
            $words = array_merge($words, $this->_prefixes($idPrefixes));
        }
        $events = array();
        foreach ($this->_commandLines(implode(" ", $words)) as $line) {
            if (!preg_match('/^(\w+)\s+(\d+):(\S+)$/D', $line, $m)) {
                throw new Dklab_Realplexor_Exception("Cannot parse the WATCH answer line \"$line\"");
            }
            $events[] = array(
                "event" => $m[1],
                "pos" => (int)$m[2],
                "id" => $m[1] === "FAKE" ? $m[3] : $this->_stripNamespace($m[3]),
            );
        }
        return $events;
    }

    /** The namespaced id, checked so that it cannot corrupt the request. */
    private function _channelId($id)
    {
        $full = $this->_namespace . $id;
        if (!is_scalar($id) || !preg_match('/^[A-Za-z0-9_]+$/D', $full)) {
            $shown = is_scalar($id) ? $full : gettype($id);
            throw new Dklab_Realplexor_Exception("Invalid channel id \"$shown\": use letters, digits and _ only");
        }
        return $full;
    }

    /** A cursor as its wire text. */
    private function _cursor($cursor)
    {
        $text = is_float($cursor) ? sprintf("%.6F", $cursor) : (string)$cursor;
        if (!preg_match('/^\d+(\.\d+)?$/D', $text)) {
            throw new Dklab_Realplexor_Exception("Invalid cursor \"$text\": expected DIGITS[.DIGITS]");
        }
        return $text;
    }

    /** Prefixes for ONLINE and WATCH; the namespace alone when none are given. */
    private function _prefixes($idPrefixes)
    {
        $prefixes = $idPrefixes === null ? array() : (array)$idPrefixes;
        if ($this->_namespace !== "" && !$prefixes) {
            $prefixes = array("");
        }
        $result = array();
        foreach ($prefixes as $prefix) {
            $full = $this->_namespace . $prefix;
            if ($full !== "" && preg_match('/[^A-Za-z0-9_]/', $full)) {
                throw new Dklab_Realplexor_Exception("Invalid id prefix \"$full\": use letters, digits and _ only");
            }
            if ($full !== "") {
                $result[] = $full;
            }
        }
        return $result;
    }

    private function _stripNamespace($id)
    {
        $length = strlen($this->_namespace);
        if ($length && strncmp($id, $this->_namespace, $length) === 0) {
            return substr($id, $length);
        }
        return $id;
    }

    /** Run a command; the non-empty lines of its answer. */
    private function _commandLines($command)
    {
        $body = $this->_request("", $command . "\n");
        $lines = array();
        foreach (preg_split('/\r?\n/', $body) as $line) {
            $line = trim($line);
            if ($line !== "") {
                $lines[] = $line;
            }
        }
        return $lines;
    }

    /**
     * Send one request and return the body of the 200 answer.
     */
    private function _request($items, $body)
    {
        $credentials = $this->_login !== null ? $this->_login . ":" . $this->_password . "@" : "";
        $request = "POST / HTTP/1.1\r\n"
            . "Host: " . $this->_host . "\r\n"
            . "Content-Length: " . strlen($body) . "\r\n"
            . "X-Realplexor: " . $this->_identifier . "=" . $credentials . $items . "\r\n"
            . "\r\n"
            . $body;

        $where = $this->_host . ":" . $this->_port;
        $host = strpos($this->_host, ":") !== false && $this->_host[0] !== "[" ? "[" . $this->_host . "]" : $this->_host;
        $address = ($this->_port == 443 ? "ssl://" : "tcp://") . $host . ":" . $this->_port;
        $timeout = (float)ini_get("default_socket_timeout");
        if ($timeout <= 0) {
            $timeout = 60;
        }
        $errno = 0;
        $errstr = "";
        $stream = @stream_socket_client($address, $errno, $errstr, $timeout);
        if (!$stream) {
            throw new Dklab_Realplexor_Exception("Cannot connect to Realplexor at $where: error #$errno: $errstr");
        }
        stream_set_timeout($stream, (int)$timeout, (int)(($timeout - (int)$timeout) * 1000000));
        try {
            for ($sent = 0; $sent < strlen($request); $sent += $written) {
                $written = @fwrite($stream, substr($request, $sent));
                if (!$written) {
                    throw new Dklab_Realplexor_Exception(
                        "Cannot send the request to Realplexor at $where: " . $this->_streamProblem($stream)
                    );
                }
            }
            @stream_socket_shutdown($stream, STREAM_SHUT_WR);
            $reply = "";
            while (!feof($stream)) {
                $chunk = @fread($stream, 65536);
                $meta = stream_get_meta_data($stream);
                if ($chunk === false || $meta["timed_out"]) {
                    throw new Dklab_Realplexor_Exception(
                        "No answer from Realplexor at $where: " . $this->_streamProblem($stream)
                    );
                }
                $reply .= $chunk;
            }
        } catch (Exception $e) {
            fclose($stream);
            throw $e;
        }
        fclose($stream);
        return $this->_replyBody($reply, $where);
    }

    private function _streamProblem($stream)
    {
        $meta = stream_get_meta_data($stream);
        if ($meta["timed_out"]) {
            return "timed out";
        }
        $error = error_get_last();
        return $error ? $error["message"] : "connection lost";
    }

    /** Check a raw reply and return its body; throw unless it is a 200. */
    private function _replyBody($reply, $where)
    {
        if ($reply === "") {
            throw new Dklab_Realplexor_Exception("No HTTP response from Realplexor at $where (empty reply)");
        }
        $parts = preg_split('/\r?\n\r?\n/', $reply, 2);
        $head = $parts[0];
        $body = isset($parts[1]) ? $parts[1] : "";
        $headLines = preg_split('/\r?\n/', $head);
        $statusLine = trim($headLines[0]);
        if (!preg_match('{^HTTP/\d+\.\d+\s+(\d{3})\b}', $statusLine, $m)) {
            throw new Dklab_Realplexor_Exception(
                "No HTTP response from Realplexor at $where; got \"" . substr($reply, 0, 200) . "\""
            );
        }
        foreach (array_slice($headLines, 1) as $line) {
            if (preg_match('/^Content-Length:\s*(\d+)\s*$/iD', $line, $cl) && (int)$cl[1] !== strlen($body)) {
                throw new Dklab_Realplexor_Exception(
                    "Bad answer from Realplexor at $where: Content-Length is {$cl[1]}, but the body has "
                    . strlen($body) . " bytes (\"$statusLine\")"
                );
            }
        }
        if ($m[1] !== "200") {
            throw new Dklab_Realplexor_Exception("Realplexor at $where answered \"$statusLine\": " . trim($body));
        }
        return $body;
    }
}
