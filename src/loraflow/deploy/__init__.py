"""Many replicas of the server behind Ray Serve (``loraflow serve --ray``, or
``serve run loraflow.deploy.app:build``): each adapter's requests go to the replicas that
hold it. Ray is an optional extra (``pip install 'loraflow[ray]'``); only ``config`` and
``command`` import without it (``command`` says how to install it)."""
