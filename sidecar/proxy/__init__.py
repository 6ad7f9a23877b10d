"""Everything that touches mitmproxy: the addon and its hooks, admission (auth, limits),
local answers, intercept-mode CA, and the shared-port server mode."""
