"""The site gateway: nodes -> verified frames -> durable queue -> MQTT."""
