"""The orchestration plane: the work-item state machine, agent tokens and registry, wake-ups, the
parsing and trigger services, and the Remote Execution API that agents call. Runs in the api-server
and the scheduler, next to the metadata DB; never connects to an agent."""
