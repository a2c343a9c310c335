# Runs after boot.py on every start. The node's app lives in /lib/node (or frozen in).
import node.app

node.app.main()
