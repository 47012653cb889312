"""``fedge simulate``: a whole fleet on one machine, real broker, real processes, real MQTT."""
