"""Knowledge the router predicts with: step latency per instance and response lengths."""
