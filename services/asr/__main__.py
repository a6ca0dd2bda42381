from services.asr.server import main

main()
