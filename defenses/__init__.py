"""Client-side defenses (privacy): composable transforms of what a client sends."""
