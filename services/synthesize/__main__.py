from services.synthesize.server import main

main()
