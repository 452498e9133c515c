"""The stream: events in, decoded and joined per partition into samples, learned by the worker;
the sources (Kafka, file, demo) and the dead letters."""
