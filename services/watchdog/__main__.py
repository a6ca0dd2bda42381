from services.watchdog.watchdog import main

main()
