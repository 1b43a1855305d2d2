"""The sandbox: a live multi-channel chat that shows what Realplexor does.

A small web application of its own, apart from the server. Its page
listens to channels through the JavaScript client (``dklab_realplexor.js``,
served by the Realplexor server at ``?identifier=SCRIPT``); its back end
publishes posts through the server's JSON API (``POST /publish`` on the
IN line), and follows ONLINE through the Python client
(``realplexor.client``) to push the list of listened channels to every
page, exactly as a real site would.

    python -m realplexor.demo            # then open http://127.0.0.1:8090/
"""
