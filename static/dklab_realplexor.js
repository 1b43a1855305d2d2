// Realplexor JavaScript client (placeholder; served with $-variables filled in).
var Dklab_Realplexor_Config = {
  waitTimeout: $WAIT_TIMEOUT,
  maxBounces: $JS_MAX_BOUNCES,
  reconnectDelay: $JS_WAIT_RECONNECT_DELAY,
  waitUri: "$JS_WAIT_URI",
  identifier: "$IDENTIFIER",
  debug: $JS_DEBUG
};
