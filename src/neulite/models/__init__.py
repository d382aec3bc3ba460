"""Networks as blocks plus a head, and the scaffolding progressive training adds."""
