"""How Danbao is run: the local operator command, the Kafka broker project, the main job."""
