"""Processes with several CPU devices, for the tests of layouts and of many processes."""


def cpu_devices_env(devices: int) -> dict:
    """The environment of a process with `devices` CPU devices that run collectives.
    XLA:CPU runs each device's collectives on one thread pool, max(NPROC or cores, devices)
    threads, and a thread waits at an all-reduce until every device's part arrives. When a
    program has several collectives ready at once, 8 devices on a 2-core machine can fill the
    pool with waiting threads and none is left for the parts still to come: the process
    deadlocks, and XLA aborts it. NPROC sizes the
    pool past anything a device can have in flight. The guard against a real deadlock is
    raised from 40 s: eight devices on two cores beside pytest's other worker can be slow."""
    return {"JAX_PLATFORMS": "cpu", "NPROC": str(16 * devices),
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "
                         "--xla_cpu_collective_call_terminate_timeout_seconds=600"}
