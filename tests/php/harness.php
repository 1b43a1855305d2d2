<?php
// Runs one test closure against the PHP client and prints its outcome as JSON:
// {"result": ...} or {"exception": class, "message": ...}. Any PHP warning or
// notice is turned into an error, so the client must run clean.
error_reporting(E_ALL);
set_error_handler(function ($severity, $message, $file, $line) {
    if (!(error_reporting() & $severity)) {
        return false;
    }
    throw new ErrorException($message, 0, $severity, $file, $line);
});
require_once __DIR__ . "/../../contrib/php/Dklab/Realplexor.php";

function rpl_run($test)
{
    $args = json_decode((string)getenv("RPL_ARGS"), true);
    try {
        $outcome = array("result" => $test($args));
    } catch (Dklab_Realplexor_Exception $e) {
        $outcome = array("exception" => get_class($e), "message" => $e->getMessage());
    }
    echo json_encode($outcome, JSON_UNESCAPED_UNICODE | JSON_UNESCAPED_SLASHES);
}
