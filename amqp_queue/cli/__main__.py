"""``python -m amqp_queue.cli``: the same as the ``amqp-queue`` console script."""

from amqp_queue.cli import main

if __name__ == "__main__":
    main()
