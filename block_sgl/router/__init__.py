"""The router side: ingest of instance streams, cluster state, policies, HTTP proxy.

Never imports sglang or torch (routers run on CPU boxes without them).
"""
