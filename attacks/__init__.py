"""Client-side attacks (poisoning, backdoors) and server-side observers (inversion).

Attacks are small composable transforms (see :mod:`attacks.base`); the threat model
(:mod:`fedsim.threat`) decides which partitions run which attack.
"""
