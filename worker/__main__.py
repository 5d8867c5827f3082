from worker.server import main

main()
